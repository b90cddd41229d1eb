import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanorlhf.config import load_module  # noqa: E402


def load_script(relpath):
    """Import an algorithm script as a module (its main() does not run: it is behind __main__)."""
    return load_module(os.path.join(ROOT, relpath))
