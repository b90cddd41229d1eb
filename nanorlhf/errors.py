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
        console.say(f"error: {e}", err=True)
        console.stop()
        sys.exit(2)
    except Exception:
        traceback.print_exc()  # into run.log; the interpreter prints it on the terminal once the console is back
        raise
    finally:
        console.stop()
        console.allow(False)
