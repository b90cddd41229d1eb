"""Errors a user can cause, reported as one clear sentence instead of a traceback."""

import contextlib
import sys


class UserError(Exception):
    """Bad input from the user (a flag, a file, a reward function). The message says what and how to fix it."""


@contextlib.contextmanager
def exit_on_user_error():
    """Wrap a script's main(): a UserError prints `error: <message>` and exits with status 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
