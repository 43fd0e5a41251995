"""Run locks: one process at a time trains a run, whichever command (sweep, train, figures)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .store import RUNS

# What a command says of a run whose lock another process holds.
LOCKED = "running elsewhere"


def lock_path(out: str | os.PathLike, run_id: str) -> Path:
    """The run's lock file: hidden and beside the run folder, so readers of ``runs/`` (pyarrow
    datasets, ``load``) never see it, and a run folder holds only its records."""
    return Path(out) / RUNS / f".{run_id}.lock"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, run_id: str) -> Iterator[bool]:
    """Hold the run's lock for the block; yields False (and holds nothing) if another process
    has it. The kernel drops an flock when its holder dies, even by SIGKILL."""
    fd = os.open(lock_path(out, run_id), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def clear_temp_files(path: Path) -> None:
    """Remove temporary files a killed writer left (call it holding the lock: none is live)."""
    if path.is_dir():
        for tmp in path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
