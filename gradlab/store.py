"""The results layout: atomic writes of one run's files, and ``load(path)`` into tidy frames.

    <out>/runs/<run_id>/config.json     resolved config + provenance
    <out>/runs/<run_id>/grads.parquet   one row per (step, layer)
    <out>/runs/<run_id>/epochs.parquet  one row per (epoch, split)
    <out>/runs/<run_id>/status.json     written last: complete | diverged | failed
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import CONFIG_FIELDS, ConfigError, RunConfig, make_config

RUNS = "runs"
FILES = ("config.json", "grads.parquet", "epochs.parquet", "status.json")
OPTIONAL_FILES = ("dists.parquet",)  # only runs that record distributions (dist_every > 0)


class StoreError(RuntimeError):
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
        raise StoreError(f"cannot write {path}: {e.strerror or type(e).__name__}: give a "
                         f"folder where files can be written") from None
    finally:
        if tmp.is_file():
            tmp.unlink()


def make_folder(path: Path) -> Path:
    """``mkdir -p``, or a one-line StoreError (e.g. when ``path`` or a parent is a file)."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"output folder {path} is a file: give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create output folder {path}: {e.strerror}: give a folder "
                         f"path that can be written") from None
    return path


def write_json(path: Path, obj: Any) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

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
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


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
    """Whether the run has a status file (complete, diverged or failed are all finished)."""
    status = read_status(run_dir(out, run_id))
    return status is not None and status.get("status") == "complete"


def read_status(path: Path) -> dict | None:
    try:
        return json.loads((path / "status.json").read_text())
    except (OSError, ValueError):
        return None


def ensure_out(out: str | os.PathLike) -> Path:
    """Create ``out/runs``; a one-line StoreError if ``out`` is a file or not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"output folder {out} is a file: give a folder path")
    make_folder(out / RUNS)
    if not os.access(out / RUNS, os.W_OK):
        raise StoreError(f"output folder {out / RUNS} is not writable: give a folder path "
                         f"that can be written")
    return out


def begin_run(out: Path, config: RunConfig, device: str, ensemble: int | None = None) -> Path:
    """Clear a stale run folder and write its config.json (the status file comes last)."""
    path = run_dir(out, config.run_id())
    path.mkdir(parents=True, exist_ok=True)
    for name in (*FILES, *OPTIONAL_FILES):
        (path / name).unlink(missing_ok=True)
    write_json(path / "config.json", {
        "run_id": config.run_id(),
        "config": config.to_dict(),
        "layer_sizes": list(config.layer_sizes),
        # ensemble: trained as one of that many stacked members (gradlab sweep --ensemble)
        "provenance": {**provenance(device), "ensemble": ensemble, "started": now()},
    })
    return path


def finish_run(path: Path, result) -> dict:
    """Write the records, then ``status.json`` last; returns the status dict."""
    run_id = result.config.run_id()
    write_parquet(path / "grads.parquet", result.grads, run_id)
    write_parquet(path / "epochs.parquet", result.epochs, run_id)
    dists = getattr(result, "dists", None)
    if dists is not None and not dists.empty:  # optional: only runs with dist_every > 0
        write_parquet(path / "dists.parquet", dists, run_id)
    meta = json.loads((path / "config.json").read_text())
    meta["provenance"]["finished"] = now()
    write_json(path / "config.json", meta)
    status = {
        "status": result.status,
        "run_id": run_id,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "final_test_accuracy": result.final_test_accuracy,
        "diverged_step": result.diverged_step,
        "error": result.error,
        "finished": meta["provenance"]["finished"],
    }
    write_json(path / "status.json", status)
    return status


# -- reading ---------------------------------------------------------------------------------


@dataclass
class Results:
    """Tidy frames of a results folder: ``grads``, ``epochs`` and ``runs`` (one row per run),
    each with the config columns joined in; ``problems`` names what could not be read."""

    grads: pd.DataFrame
    epochs: pd.DataFrame
    runs: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    dists: pd.DataFrame = field(default_factory=pd.DataFrame)  # dists.parquet's rows, if any


def config_columns(config: dict) -> dict[str, Any]:
    """Config as flat columns: ``widths`` becomes a string like "128,256" (no lists in cells),
    and ``width`` is the hidden width when all are equal (else NaN)."""
    row = {k: config.get(k) for k in CONFIG_FIELDS}
    widths = list(config.get("widths") or [])
    row["widths"] = ",".join(map(str, widths))
    row["width"] = widths[0] if widths and len(set(widths)) == 1 else None
    return row


def run_dirs(path: Path) -> list[Path]:
    if (path / "config.json").exists() or (path / "status.json").exists():
        return [path]
    if (path / RUNS).is_dir():
        return sorted(p for p in (path / RUNS).iterdir() if p.is_dir())
    raise StoreError(f"{path} is not a gradlab results folder: expected {path / RUNS}/<run_id>/")


def read_run_meta(path: Path) -> dict:
    """One run's config and status as a flat dict; raises on a damaged config.json."""
    meta = json.loads((path / "config.json").read_text())
    config = make_config(**meta["config"]).to_dict()
    status = read_status(path) or {"status": "unfinished"}
    return {
        "run_id": meta["run_id"],
        **config_columns(config),
        "status": status.get("status", "unfinished"),
        "final_test_accuracy": status.get("final_test_accuracy"),
        "diverged_step": status.get("diverged_step"),
        "error": status.get("error"),
        "device": meta.get("provenance", {}).get("device"),
        "git_sha": meta.get("provenance", {}).get("git_sha"),
        "torch": meta.get("provenance", {}).get("torch"),
        "gradlab": meta.get("provenance", {}).get("gradlab"),
    }


def load(path: str | os.PathLike, *, include_unfinished: bool = False) -> Results:
    """Load a results folder (or one run folder) into tidy pandas frames.

    Runs without ``status.json`` are unfinished and left out unless ``include_unfinished``
    (they still appear in ``runs``). A damaged file is named in ``problems`` and in a
    warning, and the rest is loaded.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist: give a results folder made by gradlab")
    metas, grads, epochs, dists, problems = [], [], [], [], []
    for rd in run_dirs(path):
        try:
            meta = read_run_meta(rd)
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
            problems.append(f"{rd}: config.json unreadable ({type(e).__name__}); skipped")
            continue
        if meta["status"] == "unfinished":
            problems.append(f"{rd}: no status.json (unfinished run)")
        metas.append(meta)
        if meta["status"] == "unfinished" and not include_unfinished:
            continue
        for name, sink in (("grads.parquet", grads), ("epochs.parquet", epochs)):
            try:
                sink.append(pq.read_table(rd / name).to_pandas())
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{rd / name}: unreadable ({type(e).__name__}); skipped")
        if (rd / "dists.parquet").exists():  # optional (dist_every > 0)
            try:
                dists.append(pq.read_table(rd / "dists.parquet").to_pandas())
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{rd / 'dists.parquet'}: unreadable ({type(e).__name__}); "
                                f"skipped")
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    runs = pd.DataFrame(metas)
    config_cols = [c for c in runs.columns if c not in ("error", "git_sha", "torch", "gradlab")]

    def join(frames: list[pd.DataFrame]) -> pd.DataFrame:
        if not frames or runs.empty:
            return pd.DataFrame()
        frame = pd.concat(frames, ignore_index=True)
        return frame.merge(runs[config_cols], on="run_id", how="left")

    return Results(grads=join(grads), epochs=join(epochs), runs=runs, problems=problems,
                   dists=join(dists))
