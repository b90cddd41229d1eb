"""How a run ends early, and what it keeps when it does.

- Ctrl-C or SIGTERM (a scheduler's preemption) finishes the current step, saves a checkpoint and exits with status
  130 or 143; a second one aborts at once. Under torchrun every rank stops at the same point (`agreed`).
- An error in the middle of a step (a reward function that raises or hangs, out of memory) saves the last completed
  step first, when that is still possible, and says where it is (`failed`).
- Out of memory (torch's, or vLLM's allocator failing to wake: nanorlhf/gpu.py) names the phase and the field to
  lower (`out_of_memory`).
"""

import os
import signal
import threading

from nanorlhf import console, distributed
from nanorlhf.errors import UserError
from nanorlhf.gpu import out_of_memory_advice

SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}  # exit status 128 + signal number


class Stop:
    """The run's stop signals and the step in flight: `begin(step, snapshot)` at each step's start (snapshot: the data
    position and random state there, what the last completed step's checkpoint needs); `save(step, snapshot)` and
    `close()` are the run's."""

    def __init__(self, output_dir, world_size, save, close):
        self.output_dir, self.world_size, self.save, self.close = output_dir, world_size, save, close
        self.signal, self.previous_handlers = None, {}
        self.step, self.snapshot = None, None
        if threading.current_thread() is threading.main_thread():
            self.previous_handlers = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def _on_signal(self, signum, frame):
        name = SIGNALS[signum][0]
        console.say(f"\n{name}: stopping after this step ({name} again to abort now)")
        self.signal = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def begin(self, step, snapshot):
        self.step, self.snapshot = step, snapshot

    def agreed(self):
        """Whether to stop here, the same answer on every rank (a loop outside steps(), PPO's value initialisation,
        asks it too). The flag is read once: a signal that lands after the read counts at the next check, not in
        this one on some ranks only (they would then wait for each other in different collectives)."""
        stop = distributed.any_rank(self.signal is not None)
        if stop and self.signal is None:
            self.signal = signal.SIGTERM  # another rank got it: every rank stops at the same point
        return stop

    def exit(self, what):
        """Leave with the signal's status after saying `what` was kept."""
        name, status = SIGNALS[self.signal]
        console.say(f"{name}: {what}")
        raise SystemExit(status)

    def restore_handlers(self):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def failed(self, weights_changed, together=False):
        """Save the last completed step for a run about to stop in the middle of step self.step, close the run, and
        say what was kept. weights_changed: this step already stepped the optimizer. together: every rank stops at
        this same point (under torchrun a save takes them all)."""
        resume = f"continue with --resume {self.output_dir}"
        if self.step is None or self.step == 1:
            message = "No step was completed, so nothing was saved"
        elif self.world_size > 1 and not together:  # a save takes every rank, and the others may be gone
            message = f"The newest checkpoint in {self.output_dir} holds the last saved state; {resume}"
        elif weights_changed:  # the weights are not the last completed step's any more
            message = f"The newest checkpoint in {self.output_dir} holds the last saved state; {resume}"
        else:
            path = os.path.join(self.output_dir, f"checkpoint-{self.step - 1}")
            if not os.path.exists(path):
                path = self.save(self.step - 1, self.snapshot)
            message = f"Saved the last completed step in {path}; {resume}"
        self.close()
        return message

    def out_of_memory(self, phase_name, weights_changed):
        """The UserError for out of memory in a timed phase, after saving what failed() can."""
        phase, fields = out_of_memory_advice(phase_name)  # what ran, and the fields that lower its memory
        return UserError(f"out of memory in {phase} ({phase_name}) at step {self.step}: lower {fields}. "
                         + self.failed(weights_changed))
