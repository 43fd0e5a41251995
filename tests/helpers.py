"""What the test modules share: the CLI through click's runner, a sweep, ``python -m gradlab``
in a real process, and a results folder read back by hand (run folders, statuses, records)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from click.testing import CliRunner, Result

from gradlab.cli import cli


def invoke(*args, catch_exceptions: bool = True) -> Result:
    """``gradlab ARGS...`` in this process (paths and numbers as they are given)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)


def sweep(data, out, *args, grid=(), catch_exceptions: bool = True) -> Result:
    """``gradlab sweep`` of ``grid`` on ``data`` into ``out``, in this process (``--jobs 1``,
    so that monkeypatches reach it) unless ``args`` give ``--jobs``."""
    args = [str(a) for a in args]
    jobs = [] if {"--jobs", "-j"} & set(args) else ["--jobs", "1"]
    return invoke("sweep", *grid, *args, *jobs, "--data-dir", data, "--out", out,
                  catch_exceptions=catch_exceptions)


def gradlab_process(*args, **popen) -> subprocess.Popen:
    """``python -m gradlab ARGS...`` in its own process, stdout and stderr as text pipes;
    ``popen`` goes to ``subprocess.Popen`` (a new session, the signals' dispositions)."""
    return subprocess.Popen([sys.executable, "-m", "gradlab", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_file(proc: subprocess.Popen, out: Path, pattern: str, timeout: float,
                  poll: float = 0.02) -> None:
    """Wait until a file under ``out`` matches ``pattern`` (``runs/*/status.json``: a run has
    finished); fail if ``proc`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not list(out.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {pattern} in time"
        time.sleep(poll)


def lines(text: str) -> list[str]:
    """The non-empty lines of ``text``, stripped (a progress bar's ``\\r`` ends a line too)."""
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]


def run_dirs(out: Path) -> list[Path]:
    """The run folders of a results folder, by name (not its lock files)."""
    return sorted(p for p in (out / "runs").iterdir() if p.is_dir())


def statuses(out: Path) -> dict[str, str]:
    """run_id -> status of every run that has a status.json."""
    return {p.parent.name: json.loads(p.read_text())["status"]
            for p in (out / "runs").glob("*/status.json")}


def records(out: Path) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Each run's grads and epochs (without the wall-clock ``seconds``), by run_id."""
    return {run.name: (pd.read_parquet(run / "grads.parquet"),
                       pd.read_parquet(run / "epochs.parquet").drop(columns="seconds"))
            for run in run_dirs(out)}


def assert_same_records(out: Path, reference: Path) -> None:
    """The same runs in both folders, with equal grads and epochs."""
    mine, theirs = records(out), records(reference)
    assert sorted(mine) == sorted(theirs)
    for run_id, frames in mine.items():
        for a, b in zip(frames, theirs[run_id], strict=True):
            pd.testing.assert_frame_equal(a, b)
