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
import math
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import CONFIG_FIELDS, RunConfig
from .errors import GradlabError
from .validate import (
    NUMERIC_COLUMNS,
    TEXT_COLUMNS,
    digests,
    is_gradlab_run,
    read_config,
    strict,
)
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
    ratio = run_ratio(records.get("grads"), run_id, meta)
    status = {"status": status.get("status", "complete"), "run_id": run_id,
              **{k: v for k, v in status.items() if k not in ("status", "run_id")},
              **({} if ratio is None else {"vanishing_ratio": ratio[0]}),
              "error": cut(status.get("error")),
              "finished": meta["provenance"]["finished"],
              # what the files were when the run finished: a change to any byte later is damage
              "sha256": digests(path)}
    write_json(path / "status.json", status)
    return status


def run_ratio(grads: pd.DataFrame | None, run_id: str, meta: dict) -> tuple[float | None] | None:
    """A gradlab run's vanishing ratio, as ``gradlab.tables.vanishing_ratios`` computes it from
    the run's grads (None, written as null, where no step gives one), in a 1-tuple; None (no
    ``vanishing_ratio`` in status.json: readers read the records) for a run without grads rows
    or of a model of the user's own (``gradlab.watch``: its last layer is found in its records).
    Written at finish so that a listing, a plan or a summary needs no record file (issue 33)."""
    from .tables import vanishing_ratios
    from .validate import is_gradlab_run

    columns = ("step", "layer", "grad_weight_norm")
    if grads is None or grads.empty or not is_gradlab_run(meta) \
            or not all(c in grads.columns for c in columns):
        return None
    depth = int(meta["config"]["depth"])
    step = grads["step"].to_numpy()
    layer = grads["layer"].to_numpy()
    norm = grads["grad_weight_norm"].to_numpy(float)
    first, last = layer == 0, layer == depth - 1
    if len(np.unique(step[first])) < first.sum() or len(np.unique(step[last])) < last.sum():
        # (steps recorded twice: pandas' merge pairs each with each)
        frame = pd.DataFrame({"run_id": run_id, "step": step, "layer": layer,
                              "grad_weight_norm": norm, "depth": depth})
        ratio = float(vanishing_ratios(frame)["vanishing_ratio"].iloc[0])
    else:  # the same pairs, ratios and median as vanishing_ratios: 0.3 ms, not 200 ms, a run
        steps, a, b = np.intersect1d(step[first], step[last], return_indices=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = norm[first][a] / norm[last][b]
        ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
        ratio = float(np.median(ratios)) if len(ratios) else math.nan
    return (ratio if math.isfinite(ratio) else None,)


ERROR_CHARS = 2000  # an error note in status.json; error.txt keeps the whole traceback


def cut(text: str | None, limit: int = ERROR_CHARS) -> str | None:
    """A note cut to ``limit`` characters, so that status.json stays small."""
    return text if text is None or len(text) <= limit else text[:limit - 1] + "…"


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


FRAMES = ("grads", "epochs", "dists", "time", "metrics")  # record frames, by file stem


class Results:
    """Tidy frames of a results folder: ``grads``, ``epochs``, ``dists`` (empty when no run has
    dists.parquet), ``time`` (recurrent layers' gradient through time: ``TIME_COLUMNS``, no rows
    when no run has time.parquet), ``metrics`` (``rec.log``'s rows) and ``runs`` (one row per
    run), each with the config columns joined in; ``problems`` names what could not be read.

    A frame of ``gradlab.load`` is read when it is first used (``load(out).runs`` parses no
    record file); a frame given to the constructor is kept as it is."""

    def __init__(self, grads: pd.DataFrame | None = None, epochs: pd.DataFrame | None = None,
                 runs: pd.DataFrame | None = None, problems: list[str] | None = None,
                 dists: pd.DataFrame | None = None, time: pd.DataFrame | None = None,
                 metrics: pd.DataFrame | None = None, *, source=None):
        self.runs = runs if runs is not None else pd.DataFrame()
        self.problems = problems if problems is not None else []
        self._frames = {"grads": grads, "epochs": epochs, "dists": dists, "time": time,
                        "metrics": metrics}
        self._source = source  # stem -> frame, for frames read when first used
        self.verified: list | None = None  # load's runs (reader.Run), in the order of runs

    def frame(self, stem: str) -> pd.DataFrame:
        """The frame of a record file stem (``FRAMES``), read on first use."""
        if self._frames[stem] is None:
            frame = self._source(stem) if self._source is not None else None
            if frame is None:
                frame = empty_time() if stem == "time" else pd.DataFrame()
            self._frames[stem] = frame
        return self._frames[stem]

    def set_frame(self, stem: str, frame: pd.DataFrame) -> None:
        self._frames[stem] = frame

    grads = property(lambda self: self.frame("grads"),
                     lambda self, v: self.set_frame("grads", v))
    epochs = property(lambda self: self.frame("epochs"),
                      lambda self, v: self.set_frame("epochs", v))
    dists = property(lambda self: self.frame("dists"),
                     lambda self, v: self.set_frame("dists", v))
    time = property(lambda self: self.frame("time"), lambda self, v: self.set_frame("time", v))
    metrics = property(lambda self: self.frame("metrics"),
                       lambda self, v: self.set_frame("metrics", v))

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


# gradlab's own columns of a run: what read_run_meta adds and a trained run's config columns
# (and the record files' columns, which the config columns are joined beside)
OWN_COLUMNS = frozenset((*RUN_KEYS, *CONFIG_FIELDS, "width", "widths", *TEXT_COLUMNS,
                         *NUMERIC_COLUMNS))


# A watched model's own layers are what gradlab counts: a user's depth or widths never stand
# in for them (the figures find the last layer by depth).
STRUCTURAL = ("depth", "widths", "width")


def field_kinds() -> dict[str, tuple[type, ...]]:
    """The Python kinds of each RunConfig field's values (numbers for an optional number)."""
    kinds = {}
    for key, value in RunConfig().to_dict().items():
        kinds[key] = ((bool,) if isinstance(value, bool) else (str,) if isinstance(value, str)
                      else (int,) if isinstance(value, int) else (int, float))
    return kinds


def own_keys(config: dict) -> dict[str, Any]:
    """A watched run's config (the user's own keys) as columns, scalars only. A key named as
    one of gradlab's run columns (run_id, status, ...), record columns (step, layer, ...) or
    structural settings (depth, widths), or as a setting (lr, activation, ...) but holding a
    value of another kind, is kept as ``config_<key>``: a user's ``depth`` (3 or "deep") never
    stands in for gradlab's, and a column never mixes kinds; ``lr = 0.1`` stays ``lr``."""
    kinds = field_kinds()
    columns: dict[str, Any] = {}
    for key, value in config.items():
        if value is not None and not isinstance(value, (str, int, float)):
            continue
        fits = key in kinds and key not in STRUCTURAL and (
            value is None or (isinstance(value, kinds[key])
                              and (bool in kinds[key] or not isinstance(value, bool))))
        name = key
        while (name in OWN_COLUMNS and not (name == key and fits)) or name in columns \
                or (name != key and name in config):
            name = f"config_{name}"
        columns[name] = value
    return columns


def read_run_meta(path: Path) -> dict:
    """One run's config and status as a flat dict; raises ``Damaged`` (one line) when its
    config.json or status.json does not read back."""
    meta = read_config(path)
    return meta_row(meta, read_status(path))


def meta_row(meta: dict, status: dict | None) -> dict:
    """A run's validated config.json and status.json (None: unfinished) as one flat row."""
    status = status or {"status": "unfinished"}
    provenance = meta.get("provenance", {})
    config = meta["config"]
    columns = config_columns(config) if is_gradlab_run(meta) else own_keys(config)
    return {
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
         run_ids: Iterable[str] | None = None, columns: Iterable[str] | None = None,
         filters=None) -> Results:
    """Load a results folder (or one run folder) into tidy pandas frames.

    Every run is verified once (``gradlab.reader``): a damaged run (a file that does not read
    back, or changed since its run finished) is named in ``problems`` and in one warning, and
    left out of every frame; the rest is loaded. Runs without ``status.json`` are unfinished:
    they are in ``runs``, and their records only with ``include_unfinished``. Record frames
    are read when first used (``load(out).runs`` parses no record file).

    Args:
        path: a results folder made by gradlab, or one run folder.
        include_unfinished: also read the records an unfinished run has so far.
        run_ids: only these runs (e.g. one sweep's, in a folder that holds more).
        columns: only these record columns (and ``run_id``; a column a file lacks is left
            out), read from the files as asked; the config columns are joined in as always.
        filters: only the record rows these keep, read as pyarrow's Parquet reader reads
            them (e.g. ``[("step", "==", 0)]``, or a ``pyarrow.compute`` expression); the
            columns it names must be in every record frame that is used.
    """
    from .reader import read_folder

    return folder_results(read_folder(path, run_ids), include_unfinished=include_unfinished,
                          columns=columns, filters=filters, stacklevel=3)


def folder_results(folder, *, include_unfinished: bool = False, columns=None, filters=None,
                   stacklevel: int = 2) -> Results:
    """``load`` of runs already verified (a ``gradlab.reader.Folder``): a sweep verifies its
    runs once, to plan, and reads its summary from the same verdicts."""
    problems = folder.problems()
    for problem in problems:
        warnings.warn(problem, stacklevel=stacklevel)
    listed = folder.listed()
    runs = pd.DataFrame([run.row() for run in listed])
    readable = [r for r in listed if r.finished or include_unfinished]
    results = Results(runs=runs, problems=problems)
    results._source = RecordSource(results, readable, columns, filters, include_unfinished)
    results.verified = listed  # each run's verdict, status.json included (summary.stored)
    return results


class RecordSource:
    """Reads the record frames of ``load``'s runs when first used, with the config columns
    joined in. A record file that does not parse (whose digest was forged: ``reader``) is
    named once and its rows left out."""

    def __init__(self, results: Results, runs: list, columns, filters, unfinished: bool):
        self.results, self.runs, self.filters = results, runs, filters
        self.columns = None if columns is None else list(columns)
        self.unfinished = unfinished

    def __call__(self, stem: str) -> pd.DataFrame | None:
        from .reader import read_records

        name = f"{stem}.parquet"
        runs = self.runs if stem not in ("grads", "epochs") or not self.unfinished else [
            r for r in self.runs if os.path.lexists(r.path / name)]
        tables, bad = read_records(runs, name, self.columns, self.filters)
        for run, problem in bad:
            line = f"{run.path / name}: {problem.removeprefix(name + ' ')}; skipped"
            warnings.warn(line, stacklevel=3)
            self.results.problems.append(line)
        if not tables:
            return None if stem == "time" else pd.DataFrame()
        return join_config(tables, self.results.runs)


def join_config(tables: list, runs: pd.DataFrame) -> pd.DataFrame:
    """Record tables of runs (one per run, in ``(run, table)`` pairs) as one frame with the
    runs' config columns joined in (every column of ``runs`` but the provenance ones)."""
    frames = [t for _, t in tables if t.num_columns]
    try:
        table = pa.concat_tables(frames, promote_options="permissive")
        frame = table.to_pandas()
    except (pa.ArrowException, ValueError):  # kinds no schema unifies: as pandas would
        frame = pd.concat([t.to_pandas() for t in frames], ignore_index=True)
    config_cols = [c for c in runs.columns if c not in ("run_id", "error", "git_sha", "torch",
                                                         "gradlab")]
    index = {run_id: i for i, run_id in enumerate(runs["run_id"])}
    rows = np.repeat(np.asarray([index[run.run_id] for run, t in tables if t.num_columns],
                                dtype=np.int64),
                     [t.num_rows for _, t in tables if t.num_columns])
    config = runs[config_cols].take(rows).reset_index(drop=True)
    return pd.concat([frame, config], axis=1)
