"""The ``gradlab`` command's first act: until a command runs, Ctrl-C and SIGTERM stop the
process with one line instead of a traceback of the imports it was in.

``gradlab/__init__.py`` calls ``install_if_command`` before anything else is imported; it does
nothing when gradlab is imported as a library (a notebook's Ctrl-C is left alone).
``gradlab.cli.Group.main`` then installs the handlers that the commands use.
"""

from __future__ import annotations

import os
import signal
import sys


def started_as_command() -> bool:
    """Whether this process is the ``gradlab`` console script or ``python -m gradlab``."""
    argv = getattr(sys, "orig_argv", [])
    as_module = any(a == "-m" and b == "gradlab" for a, b in zip(argv, argv[1:]))
    return as_module or os.path.basename(sys.argv[0] if sys.argv else "") == "gradlab"


def quit_during_start_up(signum, frame):
    # nothing has been written yet: stop at once
    sys.stderr.write("Interrupted.\n")
    raise SystemExit(128 + signum)


def install_if_command() -> None:
    if started_as_command():
        signal.signal(signal.SIGINT, quit_during_start_up)
        signal.signal(signal.SIGTERM, quit_during_start_up)
