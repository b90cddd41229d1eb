"""Errors a user can cause, reported as one clear sentence instead of a traceback."""

import contextlib
import sys
import traceback

from nanorlhf import console


class UserError(Exception):
    """Bad input from the user (a flag, a file, a reward function). The message says what and how to fix it."""


@contextlib.contextmanager
def exit_on_user_error():
    """Wrap a script's main(): a UserError prints `error: <message>` and exits with status 2. Inside it a run may
    keep library output off the terminal (nanorlhf.console); a crash's traceback goes to run.log and the terminal."""
    console.allow()
    try:
        yield
    except UserError as e:
        # under torchrun an error in the setup is every rank's own (rank 0 says it); a later one may be one rank's
        console.say(f"error: {e}", err=True, every_rank=console.running)
        console.stop()
        sys.exit(2)
    except Exception:
        traceback.print_exc()  # into run.log; the interpreter prints it on the terminal once the console is back
        raise
    finally:
        console.stop()
        console.allow(False)
