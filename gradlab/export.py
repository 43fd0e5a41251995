"""A results folder as TensorBoard event files (``gradlab export --to tensorboard``), one
folder per run, written with TensorBoard's own event writer (extra ``gradlab[tensorboard]``).

Tags, at global step = the run's optimizer step:

* ``COLUMN/LAYER_NAME`` (e.g. ``grad_weight_norm/fc0``): each recorded column of grads.parquet
  per layer; ``loss``, the batch loss, once per step; empty values (a column not recorded for a
  layer) are left out;
* ``QUANTITY/LAYER_NAME`` (e.g. ``grad_weight/fc0``): histograms of dists.parquet, with its
  stored bins;
* ``SPLIT/METRIC`` (e.g. ``train/loss``, ``test/accuracy``): the run's logged metrics
  (metrics.parquet) and its epoch records (epochs.parquet, at the step each epoch ended).

time.parquet (a recurrent layer's gradient through time, a curve over t at each step) has no
TensorBoard form and is not exported.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import GradlabError, MissingExtra
from .store import load, make_folder

IDS = ("run_id", "step", "epoch", "layer", "layer_name")  # grads columns that are not values
EVENT_FILES = "events.out.tfevents.*"


class ExportError(GradlabError, ValueError):
    """A results folder that cannot be exported as asked; the message is one line."""


def to_tensorboard(results, out, *, overwrite: bool = False) -> list[Path]:
    """Write each finished run of the results folder ``results`` as TensorBoard event files in
    ``out/<run_id>/`` (see the module docstring for the tags); returns those folders.

    Args:
        results: a results folder made by gradlab (or one run folder).
        out: the folder to write (``tensorboard --logdir OUT`` shows it).
        overwrite: replace the event files of a run that ``out`` already holds (else such a
            run is refused in one line, before anything is written).
    """
    tb = tensorboard_modules()
    loaded = load(results)
    runs = [] if loaded.runs.empty else list(
        loaded.runs.loc[loaded.runs["status"] != "unfinished", "run_id"])
    if not runs:
        raise ExportError(f"no finished runs in {results}: give a results folder with runs "
                          f"that have a status.json")
    out = Path(out)
    folders = [out / run_id for run_id in runs]
    taken = [f for f in folders if f.is_dir() and any(f.glob(EVENT_FILES))]
    if taken and not overwrite:
        raise ExportError(f"{taken[0]} already holds event files: give another --out, or "
                          f"--overwrite to replace them")
    make_folder(out)
    config = set(loaded.runs.columns)
    for run_id, folder in zip(runs, folders):
        for old in folder.glob(EVENT_FILES):
            old.unlink()
        write_run(tb, make_folder(folder), summaries(tb, loaded, run_id, config))
    return folders


def tensorboard_modules():
    """TensorBoard's event writer and protocol buffers, or a one-line ``MissingExtra``."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise MissingExtra("gradlab export --to tensorboard needs the tensorboard package: "
                           "pip install 'gradlab[tensorboard]'") from None
    return event_pb2, summary_pb2, EventFileWriter


def write_run(tb, folder: Path, values: dict[int, list]) -> None:
    """One event file in ``folder``: an event per step (in step order, as TensorBoard's reader
    expects) holding that step's values."""
    event_pb2, summary_pb2, writer_class = tb
    writer = writer_class(os.fspath(folder), max_queue_size=1024)
    try:
        for step in sorted(values):
            writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values[step])))
    finally:
        writer.close()


def summaries(tb, loaded, run_id: str, config: set[str]) -> dict[int, list]:
    """The ``Summary.Value``s of one run by step: scalars, then histograms."""
    value = tb[1].Summary.Value
    by_step: dict[int, list] = {}
    for step, tag, number in scalar_rows(loaded, run_id, config).itertuples(index=False):
        by_step.setdefault(step, []).append(value(tag=tag, simple_value=number))
    dists = of_run(loaded.dists, run_id)
    for (step, layer, quantity), rows in (dists.groupby(["step", "layer_name", "quantity"],
                                                         sort=True) if len(dists) else ()):
        histogram = histogram_proto(tb[1].HistogramProto, rows)
        if histogram is not None:
            by_step.setdefault(int(step), []).append(
                value(tag=f"{quantity}/{layer}", histo=histogram))
    return by_step


def of_run(frame: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """The rows of ``frame`` that belong to ``run_id``, each with a layer name where the frame
    has layers (``layerN`` where a record has none)."""
    if frame.empty or "run_id" not in frame:
        return frame.iloc[0:0]
    rows = frame[frame["run_id"] == run_id]
    if "layer" in rows:
        names = rows["layer_name"] if "layer_name" in rows else pd.Series(pd.NA, rows.index)
        rows = rows.assign(layer_name=names.astype(object).where(
            names.notna(), "layer" + rows["layer"].astype(str)))
    return rows


def scalar_rows(loaded, run_id: str, config: set[str]) -> pd.DataFrame:
    """(step, tag, value) of the run's recorded columns by layer, its batch loss, its logged
    metrics and its epoch records; rows without a value left out."""
    parts = [pd.DataFrame({"step": [], "tag": [], "value": []})]
    grads = of_run(loaded.grads, run_id)
    columns = [c for c in grads.columns if c not in IDS and c not in config and c != "loss"
               and pd.api.types.is_numeric_dtype(grads[c])]
    if len(grads) and columns:
        long = grads.melt(id_vars=["step", "layer_name"], value_vars=columns)
        parts.append(long.assign(tag=long["variable"] + "/" + long["layer_name"]))
    if len(grads) and "loss" in grads:
        loss = grads.groupby("step", as_index=False)["loss"].first()
        parts.append(loss.rename(columns={"loss": "value"}).assign(tag="loss"))
    metrics = of_run(loaded.metrics, run_id)
    if len(metrics):
        parts.append(metrics.assign(tag=metrics["split"] + "/" + metrics["metric"]))
    epochs = of_run(loaded.epochs, run_id)
    measured = [c for c in ("loss", "accuracy", "seconds") if c in epochs]
    if len(epochs) and measured:
        long = epochs.melt(id_vars=["step", "split"], value_vars=measured)
        parts.append(long.assign(tag=long["split"] + "/" + long["variable"]))
    rows = pd.concat([p[["step", "tag", "value"]] for p in parts], ignore_index=True)
    rows = rows[rows["value"].notna() & rows["step"].notna()]
    return rows.astype({"step": np.int64, "tag": str, "value": np.float64})


def histogram_proto(proto, rows: pd.DataFrame):
    """A TensorBoard histogram of one (step, layer, quantity) of dists.parquet: its stored bins
    (``bucket_limit`` the right edges), with the sum and sum of squares from its recorded mean
    and std where present (else from the bins' centres); None when no value was counted."""
    bins = rows[rows["stat"] == "count"].sort_values("bin_lo")
    counts = bins["value"].to_numpy(np.float64)
    n = counts.sum()
    if not len(bins) or n <= 0:
        return None
    moments = rows[rows["stat"].isin(["mean", "std"])].set_index("stat")["value"]
    if {"mean", "std"} <= set(moments.index) and np.isfinite(moments).all():
        mean, std = float(moments["mean"]), float(moments["std"])
        # (std is the sample std: n - 1 in its denominator)
        total, squares = mean * n, std ** 2 * max(n - 1, 0) + mean ** 2 * n
    else:
        centres = (bins["bin_lo"].to_numpy() + bins["bin_hi"].to_numpy()) / 2
        total, squares = float(centres @ counts), float(centres ** 2 @ counts)
    return proto(min=float(bins["bin_lo"].iloc[0]), max=float(bins["bin_hi"].iloc[-1]),
                 num=float(n), sum=total, sum_squares=squares,
                 bucket_limit=bins["bin_hi"].tolist(), bucket=counts.tolist())
