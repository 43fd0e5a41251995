"""A pool worker stopped by SIGTERM while a C callback runs (numba compiling a kernel): the
KeyboardInterrupt cannot unwind there, and Python would print it with a traceback and go on.
The worker's unraisable hook stops it quietly instead (exit 143)."""

import subprocess
import sys
from pathlib import Path

CODE = """
import sys
from gradlab import executors
sys.unraisablehook = executors._quiet_interrupt
class InCallback:
    def __del__(self):  # an exception here is "unraisable", as in a ctypes callback
        raise {exc}
x = InCallback()
del x
print("went on")
"""


def run(exc: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CODE.format(exc=exc)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)


def test_an_interrupt_in_a_callback_stops_the_worker_quietly():
    r = run("KeyboardInterrupt")
    assert (r.returncode, r.stdout, r.stderr) == (143, "", "")


def test_any_other_unraisable_error_is_reported_as_before():
    r = run("ValueError('x')")
    assert r.returncode == 0 and r.stdout == "went on\n"
    assert "ValueError" in r.stderr and "Exception ignored" in r.stderr
