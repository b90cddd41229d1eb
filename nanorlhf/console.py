"""A quiet console: a script prints the lines its user needs (what is loading, the wandb notice, the progress bar, the
run's warnings, the summary, errors) and nothing else; everything, library start-up chatter included (vLLM, torch,
transformers, wandb: Python and C alike), goes to <output_dir>/run.log. `--verbose true` shows it all instead.

The redirection is at the file-descriptor level (fds 1 and 2 point at the log), so it catches C++ warnings and child
processes too; `say()` writes to the saved terminal and to the log. Only a script run from the command line goes
quiet (scripts enter `errors.exit_on_user_error()`, which allows it and shows a crash's traceback on the terminal):
code that calls main() in-process (tests, benchmarks) keeps its streams.
"""

import os
import shutil
import sys
import tempfile

_allowed = False  # set by the script's entry point (errors.exit_on_user_error)
# Under torchrun only rank 0 talks to the terminal; rank r logs to run.rank<r>.log (nanorlhf/distributed.py)
_RANK = int(os.environ.get("RANK", 0))
running = False  # set once a run's steps begin: from then on an error may be one rank's alone (see say)
_state = None  # while quiet: {"out", "err": the terminal, "saved": (fd 1, fd 2) copies, "log": path}


def allow(value=True):
    global _allowed
    _allowed = value


def start():
    """Send fds 1 and 2 to a temporary log until attach() names the run folder. No-op unless allowed."""
    global _state
    if not _allowed or _state is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd, path = tempfile.mkstemp(prefix="nanorlhf-", suffix=".log")
    _state = {"out": os.fdopen(os.dup(1), "w", buffering=1), "err": os.fdopen(os.dup(2), "w", buffering=1),
              "saved": saved, "log": path}
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def attach(output_dir):
    """From now on the log is <output_dir>/run.log (appended to: a resumed run adds to it), with what came before."""
    global _state
    if _state is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    path = os.path.join(output_dir, "run.log" if _RANK == 0 else f"run.rank{_RANK}.log")
    with open(path, "ab") as log, open(_state["log"], "rb") as early:
        shutil.copyfileobj(early, log)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.remove(_state["log"])
    _state["log"] = path


def stop():
    """Give fds 1 and 2 back to the terminal."""
    global _state
    if _state is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, saved in zip((1, 2), _state["saved"]):
        os.dup2(saved, fd)
        os.close(saved)
    if os.path.basename(_state["log"]).startswith("nanorlhf-"):  # no run folder yet (bad input): nothing to keep
        os.remove(_state["log"])
    _state["out"].close()
    _state["err"].close()
    _state = None


def terminal(err=True):
    """The stream the user sees (the progress bar's)."""
    return (_state["err" if err else "out"]) if _state else (sys.stderr if err else sys.stdout)


def say(text, err=False, every_rank=False):
    """Print a line for the user: on the terminal, and in run.log when quiet. Under torchrun the other ranks write
    it to their own log only, unless every_rank (an error that may be that rank's alone: then prefixed with it)."""
    if _RANK != 0:
        if _state is not None:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)
        if every_rank:
            print(f"rank {_RANK}: {text}", file=_state["err" if err else "out"] if _state else sys.stderr, flush=True)
        return
    if _state is not None:
        print(text, file=_state["err" if err else "out"], flush=True)
    print(text, file=sys.stderr if err else sys.stdout, flush=True)
