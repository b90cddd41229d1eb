"""Math reward for the R1-Zero style run: 1.0 when the last \\boxed{...} of a completion equals the reference answer.

Equality is decided by math-verify (https://github.com/huggingface/Math-Verify), which parses LaTeX into sympy and
compares values: \\frac{1}{2} = 0.5, 2\\sqrt{2} = \\sqrt{8}, x \\in [1,2) = [1, 2) but not [1,2], \\{1,2\\} = \\{2,1\\}.

Why worker processes: sympy can spend minutes or gigabytes on an answer like \\boxed{9^{9^{9^{9}}}}, and math-verify's
own time limit is a SIGALRM that only works in the main thread and cannot stop work inside C code. So every check runs
in one of a few worker processes, each this file started with `python math_verifier.py` (nothing to pickle, none of
the trainer's torch/CUDA state copied); a check not answered within `timeout` seconds has its worker killed and
replaced. Such a check scores 0.0 and is counted in `verifier_stats` (timeouts, crashes) for the training log; nothing
is raised. Identical (answer, reference) pairs in a batch are checked once, so a group repeating a pathological answer
costs one timeout, not one per completion.

Use:  --reward_fn examples/r1-v0/math_verifier.py:math_reward   (the dataset needs an `answer` or MetaMathQA `response` column)
"""

import atexit
import json
import os
import select
import subprocess
import sys
import time

TIMEOUT = 5.0  # seconds one check may take before its worker is killed
WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))  # worker processes, started on the first call
WORKER_MEMORY = 4 << 30  # bytes of address space per worker
STARTUP_TIMEOUT = 60.0  # seconds a new worker may take to import math-verify

verifier_stats = {"checks": 0, "timeouts": 0, "crashes": 0}  # cumulative over the run, for the training log
_workers = []  # live worker processes


def last_boxed(text):
    """Content of the last \\boxed{...} in text, braces matched, or None if there is none or it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    while i < len(text):
        if text[i] == "\\":  # \{ and \} are set braces, not grouping
            i += 1
        elif text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : i]
        i += 1
    return None


def math_reward(prompts, completions, answer=None, response=None, timeout=TIMEOUT, **_):
    """1.0 per completion whose last \\boxed{} answer equals its reference, else 0.0. The reference is the
    `answer` column (MATH-500), or else the "The answer is: X" ending of the `response` column (MetaMathQA)."""
    if answer is None:
        answer = [r.rsplit("The answer is:", 1)[-1].strip() for r in response]
    pairs = [(last_boxed(c), str(a)) for c, a in zip(completions, answer)]
    scores = _check([p for p in dict.fromkeys(pairs) if p[0] and p[0].strip()], timeout)
    return [scores.get(p, 0.0) for p in pairs]


math_reward.metrics = verifier_stats  # logged every step as reward_math_reward_<key> (see nanorlhf.run)


def _check(pairs, timeout):
    """{(boxed, reference): score} for distinct pairs, at most one in flight per worker, each under `timeout` s."""
    scores, todo, busy = {}, list(reversed(pairs)), {}  # busy: worker -> (pair, deadline)
    for worker in [w for w in _workers if w.poll() is not None]:  # died between calls (OOM killer, ...)
        verifier_stats["crashes"] += 1
        _kill(worker)
    while todo or busy:
        if not busy and len(_workers) < WORKERS:  # only with nothing in flight: no deadline runs out meanwhile
            _start_workers(WORKERS - len(_workers))
        for worker in _workers:
            if todo and worker not in busy:
                busy[worker] = todo.pop(), time.monotonic() + timeout
                try:
                    worker.stdin.write(json.dumps(busy[worker][0]) + "\n")
                    worker.stdin.flush()
                except BrokenPipeError:  # it died while idle: seen as EOF below
                    pass
        wait = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
        ready, _, _ = select.select([w.stdout for w in busy], [], [], wait)
        for worker in list(busy):
            pair, deadline = busy[worker]
            if worker.stdout in ready:
                reply = worker.stdout.readline()
                scores[pair] = 1.0 if reply == "1\n" else 0.0
                if not reply:  # EOF: the worker died
                    verifier_stats["crashes"] += 1
                    _kill(worker)
            elif time.monotonic() > deadline:
                scores[pair] = 0.0
                verifier_stats["timeouts"] += 1
                _kill(worker)
            else:
                continue
            verifier_stats["checks"] += 1
            del busy[worker]
    return scores


def _start_workers(n):
    """Start n workers and wait until each has imported math-verify, so start-up never counts against a check."""
    new = [subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True) for _ in range(n)]
    _workers.extend(new)
    for worker in new:
        ready, _, _ = select.select([worker.stdout], [], [], STARTUP_TIMEOUT)
        if not ready or worker.stdout.readline() != "ready\n":
            _shutdown()
            raise RuntimeError(f"the math verifier worker ({sys.executable} {__file__}) did not start; "
                               "is math-verify installed (pip install math-verify)? See its error above.")


def _kill(worker):
    worker.kill()
    worker.communicate()  # reap it (no zombie) and close its pipes
    _workers.remove(worker)


@atexit.register
def _shutdown():
    while _workers:
        _kill(_workers[-1])


def _serve():
    """Worker loop: read a JSON [boxed, reference] per line from stdin, answer "1" (equal) or "0" on stdout."""
    import ctypes
    import logging
    import resource
    import signal

    replies, sys.stdout = sys.stdout, sys.stderr  # stray prints from libraries must not look like replies
    from math_verify import parse, verify

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which then shuts the workers down
    if sys.platform == "linux":  # and if the trainer is killed outright, the kernel kills a busy worker too
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (fires when the starting thread exits)
    # a runaway expression gets MemoryError here instead of waking the OOM killer, which may pick the trainer
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": the parent enforces it
    verify(parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None)  # warm up
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        boxed, reference = json.loads(line)
        equal = verify(parse(f"${reference}$", parsing_timeout=None), parse(f"${boxed}$", parsing_timeout=None),
                       timeout_seconds=None)  # math-verify returns False on its own errors
        print("1" if equal else "0", file=replies, flush=True)


if __name__ == "__main__":
    _serve()
