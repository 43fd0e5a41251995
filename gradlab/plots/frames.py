"""Tidy helpers of the figures: which rows and columns can be drawn, notes on what was left
out, and the per-run means they draw.

A frame may lack any facet or hue column (a frame of ``gradlab.watch`` has no depth,
activation or seed): ``facet_column`` says which are there, and a missing one is not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..tables import last_layer, run_info, table_keys, with_runs, with_setup

MAX_LISTED = 4  # diverged runs named in a figure title before "+N more"


def facet_column(data: pd.DataFrame, column: str | None) -> str | None:
    """``column`` when ``data`` has it, else None: a facet or hue that is not there is simply
    not drawn."""
    return column if column is not None and column in data.columns else None


def by_setup(data: pd.DataFrame, hue: str | None, *facets: str | None
             ) -> tuple[pd.DataFrame, str | None]:
    """``(data, hue)``, with ``hue="activation"`` replaced by a ``setup`` label per run (as
    ``gradlab plot`` draws them: "relu, init=kaiming_normal") where runs that differ in another
    setting (init, lr, ...) than the facets would otherwise share one line, and its band be the
    spread between those settings drawn as if it were seed noise."""
    if hue != "activation" or "run_id" not in data.columns or "setup" in data.columns:
        return data, hue
    runs = data.drop_duplicates("run_id")
    shown = {"activation", "depth", "seed", *facets}
    if not [c for c in table_keys(runs) if c not in shown]:
        return data, hue
    return with_setup(data, runs)


def hidden_rows(data: pd.DataFrame, x: str = "layer") -> pd.DataFrame:
    """The rows of hidden layers (every layer but each run's output layer, which has no
    activation)."""
    return data[data[x] < last_layer(data)]


def check_columns(data: pd.DataFrame, *columns: str | None) -> None:
    missing = [c for c in columns if c and c not in data.columns]
    if missing:
        raise ValueError(f"data has no column {missing[0]!r}: pass a frame of gradlab.load")


def run_label(row) -> str:
    parts = [str(row.activation)] if hasattr(row, "activation") else []
    parts += [f"{key} {getattr(row, key)}" for key in ("depth", "seed") if hasattr(row, key)]
    text = " ".join(parts) or str(row.run_id)
    step = getattr(row, "diverged_step", None)
    if getattr(row, "status", None) == "diverged" and step is not None and step == step:
        text += f" (step {int(step)})"
    return text


def run_notes(data: pd.DataFrame) -> list[str]:
    """Lines naming the diverged and failed runs in ``data`` (their records end early)."""
    if data.empty or "status" not in data.columns:
        return []
    runs = run_info(with_runs(data)).sort_values(
        [c for c in ("activation", "depth", "seed", "run_id") if c in data.columns])
    notes = []
    for status in ("diverged", "failed"):
        labels = [run_label(r) for r in runs[runs["status"] == status].itertuples()]
        if labels:
            more = f" +{len(labels) - MAX_LISTED} more" if len(labels) > MAX_LISTED else ""
            notes.append(f"{status}, drawn up to that point: "
                         f"{'; '.join(labels[:MAX_LISTED])}{more}")
    return notes


def finite(data: pd.DataFrame, y: str, *, log: bool = False,
           label: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Rows of ``data`` whose ``y`` can be drawn, and a note of how many were left out: NaN/inf
    (e.g. from a diverged run), and zeros or negatives on a log axis. ``label`` names ``y`` in
    the note."""
    values = data[y].to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    label = label or y
    notes = [f"{int(bad.sum())} non-finite {label} values dropped"] if bad.any() else []
    if log:
        nonpositive = np.isfinite(values) & (values <= 0)
        if nonpositive.any():
            notes.append(f"{int(nonpositive.sum())} zero {label} values not on the log axis")
        bad |= nonpositive
    return data[~bad], notes


def first_epoch(data: pd.DataFrame, epoch: int | None) -> pd.DataFrame:
    """The rows of ``epoch`` (all rows when None, or when the frame has no epochs)."""
    return data if epoch is None or "epoch" not in data else data[data["epoch"] == epoch]


def steps_text(data: pd.DataFrame, epoch: int | None) -> str:
    if epoch is None or "epoch" not in data:
        return "all recorded steps"
    return f"steps of epoch {epoch}"


def levels(data: pd.DataFrame, column: str | None) -> list:
    """The sorted values of ``column`` (an ordered categorical's in its order); none where the
    frame lacks it (e.g. a watched model's runs have no activation or depth)."""
    if column is None or column not in data:
        return []
    values = data[column]
    if isinstance(values.dtype, pd.CategoricalDtype) and values.dtype.ordered:
        present = set(values.dropna().tolist())  # (e.g. layer names in forward order)
        return [c for c in values.dtype.categories if c in present]
    return sorted(values.dropna().unique().tolist())


def most_runs(data: pd.DataFrame, by: Sequence[str | None]) -> int:
    """The largest number of runs behind one point (one ``by`` group); 1 means no point has a
    mean over seeds, and no CI."""
    by = [c for c in by if c]
    if data.empty:
        return 0
    if not by:
        return int(data["run_id"].nunique())
    return int(data.groupby(by, sort=False, dropna=False)["run_id"].nunique().max())


def over_seeds(data: pd.DataFrame, by: Sequence[str], y: str, log: bool) -> pd.DataFrame:
    """Mean of ``y`` per ``by`` over runs (seeds): geometric where the axis is log, as seaborn
    averages on a log axis."""
    values = np.log(data[y]) if log else data[y]
    means = values.groupby([data[c] for c in by], sort=True, dropna=False).mean()
    return (np.exp(means) if log else means).rename(y).reset_index()


def bin_steps(data: pd.DataFrame, x: str, bins: int | None) -> tuple[pd.DataFrame, int]:
    """Replace ``x`` (steps) by the centre of one of at most ``bins`` equal bins, so that long
    runs draw as readable curves; returns the frame and the bin width in steps."""
    if not bins or data.empty:
        return data, 1
    width = max(1, math.ceil((int(data[x].max()) + 1) / bins))
    if width == 1:
        return data, 1
    return data.assign(**{x: (data[x] // width) * width + (width - 1) / 2}), width


def inactive_fraction(grads: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Hidden-layer rows with ``inactive_frac``: ``saturated_frac`` for runs that record it
    (sigmoid, tanh, softsign), else ``dead_frac`` (relu family), and ``inactive_kind`` naming
    which. Runs with neither (e.g. gelu) are left out and named in the returned notes."""
    hidden = hidden_rows(grads)
    by_run = hidden["run_id"]
    has_sat = hidden["saturated_frac"].notna().groupby(by_run).transform("any")
    has_dead = hidden["dead_frac"].notna().groupby(by_run).transform("any")
    kind = np.where(has_sat, "saturated", np.where(has_dead, "dead", ""))
    value = np.where(has_sat, hidden["saturated_frac"], hidden["dead_frac"])
    out = hidden.assign(inactive_frac=value, inactive_kind=kind)
    unmeasured = out[out["inactive_kind"] == ""]
    notes = []
    if not unmeasured.empty:
        names = (unmeasured["activation"].astype(str).unique() if "activation" in out
                 else unmeasured["run_id"].astype(str).unique())
        notes = [f"no saturation or dead-unit measure for {', '.join(sorted(names))}"]
    return out[out["inactive_kind"] != ""], notes
