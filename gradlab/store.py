"""The results layout: atomic writes of one run's files, and ``load(path)`` into tidy frames.

    <out>/runs/<run_id>/config.json     resolved config + provenance
    <out>/runs/<run_id>/grads.parquet   one row per (step, layer)
    <out>/runs/<run_id>/epochs.parquet  one row per (epoch, split)
    <out>/runs/<run_id>/dists.parquet   optional
    <out>/runs/<run_id>/time.parquet    optional: recurrent layers' gradient through time
    <out>/runs/<run_id>/metrics.parquet optional: the user's logged metrics (``rec.log``)
    <out>/runs/<run_id>/status.json     written last: complete | diverged | failed

Every file read back goes through ``gradlab.validate``: a damaged one is named, never a traceback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import CONFIG_FIELDS, RunConfig
from .errors import GradlabError
from .validate import Damaged, digests, is_gradlab_run, read_config, read_records, strict
from .validate import read_status as read_valid_status

RUNS = "runs"
FILES = ("config.json", "grads.parquet", "epochs.parquet", "status.json")
# What a new run clears from its folder besides FILES: left by an earlier try of the same run.
STALE = ("dists.parquet", "time.parquet", "metrics.parquet", "error.txt")


class StoreError(GradlabError, RuntimeError):
    """A results path is not usable; the message is one line."""


def run_dir(out: str | os.PathLike, run_id: str) -> Path:
    return Path(out) / RUNS / run_id


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary name in the same folder, then rename;
    a path that cannot be written is a one-line StoreError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise StoreError(f"cannot write {shorten(path)}: {e.strerror or type(e).__name__}: give a "
                         f"folder where files can be written") from None
    finally:
        with contextlib.suppress(OSError):  # e.g. a name too long: there is no tmp then
            tmp.unlink(missing_ok=True)


def make_folder(path: Path) -> Path:
    """``mkdir -p``, or a one-line StoreError (e.g. when ``path`` or a parent is a file, or a
    name is too long)."""
    try:
        if path.exists() and not path.is_dir():
            raise StoreError(f"output folder {path} is a file: give a folder path")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create output folder {shorten(path)}: "
                         f"{e.strerror or type(e).__name__}: give a folder path that can be "
                         f"written") from None
    return path


def shorten(path: Path) -> str:
    """A path for a one-line message: its long components cut (a name over 255 bytes is what
    some of these messages are about)."""
    return os.sep.join(p if len(p) <= 40 else f"{p[:20]}...({len(p)} chars)"
                       for p in str(path).split(os.sep))


def write_json(path: Path, obj: Any) -> None:
    def write(tmp: Path) -> None:
        # strict JSON: NaN and inf become null, as strict readers (JSON.parse) require
        text = json.dumps(strict(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
        tmp.write_text(text + "\n")

    atomic_write(path, write)


# Types of record columns that a frame without rows cannot tell (all others are floats): a run
# that diverged in its first epoch has no epoch rows, and its file must still have the schema of
# the others, or readers of the whole folder (pyarrow datasets, gradlab.load) fail or fall back
# to objects.
COLUMN_DTYPES = {"epoch": "int64", "step": "int64", "layer": "int64", "split": "str"}


def write_parquet(path: Path, frame: pd.DataFrame, run_id: str) -> None:
    if frame.empty:
        frame = frame.astype({c: COLUMN_DTYPES.get(c, "float64") for c in frame.columns
                              if frame[c].dtype == object})
    frame = frame.copy()
    frame.insert(0, "run_id", run_id)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    # page checksums: damage inside the data, not only a cut file, is found when read back
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True))


def git_sha() -> str | None:
    """The commit of the gradlab checkout this code runs from, if it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(device: str) -> dict[str, Any]:
    """Versions, git SHA, device, argv and host: what is needed to say where records came from."""
    import numpy
    import torch

    from . import __version__

    return {
        "gradlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "device": device,
        "threads": torch.get_num_threads(),
        "argv": list(sys.argv),
    }


def is_complete(out: str | os.PathLike, run_id: str) -> bool:
    """Whether the run is complete: its status says so and every file it promises reads back."""
    from .validate import check_run

    status, problems = check_run(run_dir(out, run_id))
    return status is not None and status["status"] == "complete" and not problems


def read_status(path: Path) -> dict | None:
    """The run folder's status.json, validated; None when it has none. Raises ``Damaged``
    (one line) when it is there but invalid."""
    return read_valid_status(path)


def set_aside(path: Path) -> Path:
    """Move a damaged run's files into ``path/damaged-<UTC time>/`` (nothing a user could read
    is deleted) so that the run can be trained again; returns that folder."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = make_folder(path / f"damaged-{stamp}")
    for file in path.iterdir():
        if file.is_file() and not file.name.startswith("."):
            os.replace(file, aside / file.name)
    return aside


def ensure_out(out: str | os.PathLike) -> Path:
    """Create ``out/runs``; a one-line StoreError if ``out`` is empty, a file or not writable."""
    if not str(out).strip():  # (Path("") is the current folder: never written into unasked)
        raise StoreError("the output folder is empty (''): give a folder path")
    out = Path(out)
    make_folder(out)  # says so when out is a file
    make_folder(out / RUNS)
    if not os.access(out / RUNS, os.W_OK):
        raise StoreError(f"output folder {out / RUNS} is not writable: give a folder path "
                         f"that can be written")
    return out


EPOCH_COLUMNS = ("epoch", "split", "step", "loss", "accuracy", "seconds")  # epochs.parquet
# time.parquet: per (step, layer, time step t) of a recurrent layer, ‖∂L/∂x_t‖ and ‖∂L/∂y_t‖
TIME_COLUMNS = ("run_id", "step", "epoch", "layer", "layer_name", "t", "grad_input_norm",
                "grad_output_norm")


def empty_time() -> pd.DataFrame:
    """A time frame (``TIME_COLUMNS``) without rows, with the columns' dtypes."""
    text = ("run_id", "layer_name")
    return pd.DataFrame({c: pd.Series(dtype=object if c in text else
                                      "float64" if c.endswith("norm") else "int64")
                         for c in TIME_COLUMNS})


def open_run(out: Path, run_id: str, meta: dict) -> Path:
    """Start writing run ``run_id`` of ``out``: clear what a stale run left, then write its
    config.json (``meta``, with ``run_id`` first); the status file comes last (``close_run``).
    The one writer of a run folder: ``train``, sweeps and ``watch`` all go through it."""
    path = run_dir(out, run_id)
    path.mkdir(parents=True, exist_ok=True)
    for name in FILES + STALE:
        (path / name).unlink(missing_ok=True)
    for stale in path.glob(".*.tmp"):  # what a killed save left (atomic_write's names)
        stale.unlink(missing_ok=True)
    write_json(path / "config.json", {"run_id": run_id, **meta})
    return path


def close_run(path: Path, run_id: str, records: dict[str, pd.DataFrame], status: dict) -> dict:
    """Write the run's records (``records``: file stem -> frame, e.g. ``grads``; an empty
    optional frame is not written), stamp the config's finish time, then ``status.json`` last
    with the sha256 of every file; returns the status dict."""
    for stem, frame in records.items():
        if frame is not None and (stem in ("grads", "epochs") or not frame.empty):
            write_parquet(path / f"{stem}.parquet", frame, run_id)
    meta = json.loads((path / "config.json").read_text())
    meta["provenance"]["finished"] = now()
    write_json(path / "config.json", meta)
    status = {"status": status.get("status", "complete"), "run_id": run_id,
              **{k: v for k, v in status.items() if k not in ("status", "run_id")},
              "finished": meta["provenance"]["finished"],
              # what the files were when the run finished: a change to any byte later is damage
              "sha256": digests(path)}
    write_json(path / "status.json", status)
    return status


def begin_run(out: Path, config: RunConfig, device: str, ensemble: int | None = None) -> Path:
    """Open the run folder of ``config`` (``open_run``)."""
    return open_run(out, config.run_id(), {
        "config": config.to_dict(),
        "layer_sizes": list(config.layer_sizes),
        # ensemble: trained as one of that many stacked members (gradlab sweep --ensemble)
        "provenance": {**provenance(device), "ensemble": ensemble, "started": now()},
    })


def finish_run(path: Path, result) -> dict:
    """Write a ``RunResult``'s records, then ``status.json`` last (``close_run``)."""
    return close_run(path, result.config.run_id(), {
        "grads": result.grads, "epochs": result.epochs,
        "dists": getattr(result, "dists", None),  # optional: only runs with dist_every > 0
    }, {
        "status": result.status,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "final_test_accuracy": result.final_test_accuracy,
        "diverged_step": result.diverged_step,
        "error": result.error,
    })


# -- reading ---------------------------------------------------------------------------------


@dataclass
class Results:
    """Tidy frames of a results folder: ``grads``, ``epochs``, ``dists`` (empty when no run has
    dists.parquet), ``time`` (recurrent layers' gradient through time: ``TIME_COLUMNS``, no rows
    when no run has time.parquet) and ``runs`` (one row per run), each with the config columns
    joined in; ``problems`` names what could not be read."""

    grads: pd.DataFrame
    epochs: pd.DataFrame
    runs: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    dists: pd.DataFrame = field(default_factory=pd.DataFrame)
    time: pd.DataFrame = field(default_factory=empty_time)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)  # rec.log's rows

    def __repr__(self) -> str:
        """One line: runs by status and the rows of each frame (not the frames themselves)."""
        statuses = self.runs["status"].value_counts() if "status" in self.runs else {}
        counts = ", ".join(f"{n} {s}" for s, n in sorted(dict(statuses).items()))
        problems = f", {len(self.problems)} problems" if self.problems else ""
        return (f"Results({len(self.runs)} runs{f' ({counts})' if counts else ''}; "
                f"grads {len(self.grads)} rows, epochs {len(self.epochs)} rows{problems})")

    def only(self, run_ids: Iterable[str]) -> Results:
        """These results cut to the runs ``run_ids`` (e.g. one sweep's, in a folder that holds
        more); ``problems`` are kept whole."""
        keep = set(run_ids)

        def cut(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[frame["run_id"].isin(keep)] if "run_id" in frame else frame

        return Results(cut(self.grads), cut(self.epochs), cut(self.runs), self.problems,
                       cut(self.dists), cut(self.time), cut(self.metrics))


def config_columns(config: dict) -> dict[str, Any]:
    """Config as flat columns: ``widths`` becomes a string like "128,256" (no lists in cells),
    and ``width`` is the hidden width when all are equal (else NaN)."""
    row = {k: config.get(k) for k in CONFIG_FIELDS}
    widths = list(config.get("widths") or [])
    row["widths"] = ",".join(map(str, widths))
    row["width"] = widths[0] if widths and len(set(widths)) == 1 else None
    return row


def run_dirs(path: Path) -> list[Path]:
    """The run folders of a results folder, or ``[path]`` for a run folder itself."""
    try:
        if (path / "config.json").exists() or (path / "status.json").exists():
            return [path]
        if (path / RUNS).is_dir():
            return sorted(p for p in (path / RUNS).iterdir() if p.is_dir())
    except OSError as e:
        raise StoreError(f"cannot read {shorten(path)}: {e.strerror or type(e).__name__}") from None
    raise StoreError(f"{path} is not a gradlab results folder: expected {path / RUNS}/<run_id>/")


# what read_run_meta adds to a run's own settings (a user's key of one of these names is kept
# as config_<key>)
RUN_KEYS = ("run_id", "source", "status", "final_test_accuracy", "diverged_step", "error",
            "device", "git_sha", "torch", "gradlab")


def read_run_meta(path: Path) -> dict:
    """One run's config and status as a flat dict; raises ``Damaged`` (one line) when its
    config.json or status.json does not read back."""
    meta = read_config(path)
    status = read_status(path) or {"status": "unfinished"}
    provenance = meta.get("provenance", {})
    config = meta["config"]
    columns = config_columns(config) if is_gradlab_run(meta) else {
        k: v for k, v in config.items() if v is None or isinstance(v, (str, int, float))}
    columns = {f"config_{k}" if k in RUN_KEYS else k: v for k, v in columns.items()}
    return {  # (a user's key named as one of gradlab's is kept as config_<key>)
        "run_id": meta["run_id"],
        "source": meta.get("source", "gradlab"),
        **columns,
        "status": status["status"],
        "final_test_accuracy": status.get("final_test_accuracy"),
        "diverged_step": status.get("diverged_step"),
        "error": status.get("error"),
        "device": provenance.get("device"),
        "git_sha": provenance.get("git_sha"),
        "torch": provenance.get("torch"),
        "gradlab": provenance.get("gradlab"),
    }


def load(path: str | os.PathLike, *, include_unfinished: bool = False,
         run_ids: Iterable[str] | None = None) -> Results:
    """Load a results folder (or one run folder) into tidy pandas frames.

    Runs without ``status.json`` are unfinished and left out unless ``include_unfinished``
    (they still appear in ``runs``). A damaged file (``gradlab.validate``) is named in
    ``problems`` and in a warning, and the rest is loaded: a run whose config.json or
    status.json does not read back is left out, a record file that does not is left out alone.
    Given ``run_ids``, only those runs are kept (``Results.only``).
    """
    path = Path(path)
    try:
        there = path.exists()
    except OSError as e:  # e.g. a name too long
        raise StoreError(f"cannot read {shorten(path)}: {e.strerror or type(e).__name__}") from None
    if not there:
        raise StoreError(f"{path} does not exist: give a results folder made by gradlab")
    metas, grads, epochs, dists, times, metrics, problems = [], [], [], [], [], [], []
    for rd in run_dirs(path):
        try:
            meta = read_run_meta(rd)
        except Damaged as e:
            problems.append(f"{rd}: {e}; skipped")
            continue
        if meta["status"] == "unfinished":
            problems.append(f"{rd}: no status.json (unfinished run)")
        metas.append(meta)
        if meta["status"] == "unfinished" and not include_unfinished:
            continue
        for name, sink in (("grads.parquet", grads), ("epochs.parquet", epochs),
                           ("dists.parquet", dists), ("time.parquet", times),
                           ("metrics.parquet", metrics)):
            if name not in ("grads.parquet", "epochs.parquet") and not (rd / name).exists():
                continue  # optional
            try:
                sink.append(read_records(rd, name))
            except Damaged as e:
                problems.append(f"{rd / name}: {str(e).removeprefix(name + ' ')}; skipped")
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    runs = pd.DataFrame(metas)
    config_cols = [c for c in runs.columns if c not in ("error", "git_sha", "torch", "gradlab")]

    def join(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frames = [f for f in frames if len(f.columns)]
        if not frames or runs.empty:
            return pd.DataFrame()
        frame = pd.concat(frames, ignore_index=True)
        return frame.merge(runs[config_cols], on="run_id", how="left")

    results = Results(grads=join(grads), epochs=join(epochs), runs=runs, problems=problems,
                      dists=join(dists), time=join(times) if times else empty_time(),
                      metrics=join(metrics))
    return results if run_ids is None else results.only(run_ids)
