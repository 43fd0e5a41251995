"""The tidy numbers behind the figures and the summaries: one row per run with its config,
per-run vanishing ratios, final accuracy, and their tables per setup (mean over seeds).

Plain pandas functions of the frames of ``gradlab.load``; ``gradlab.plots`` draws them,
``gradlab.report`` and ``gradlab sweep`` print them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .config import CONFIG_FIELDS

# σ′'s largest value (at z = 0). SIGMOID_MAX_SLOPE ** (depth − 1), the product of it over a net's
# sigmoid layers, is the most that σ′ alone lets through from the last layer to the first; the
# measured ratio of weight-gradient norms also carries the weights and each layer's inputs, and
# can lie above it (the quickstart's depth-3 sigmoid net does).
SIGMOID_MAX_SLOPE = 0.25
ONE_RUN = "run"  # the run_id given to a frame without one
NAMED_DEFAULTS = ("init", "bias_init")  # "default" is named in labels: PyTorch's own init
RUN_COLUMNS = ("run_id", *CONFIG_FIELDS, "width", "status", "diverged_step", "setup")


def run_info(data: pd.DataFrame, *extra: str | None) -> pd.DataFrame:
    """One row per run: the columns of ``data`` that are constant within a run, plus ``extra``."""
    columns = [c for c in dict.fromkeys((*RUN_COLUMNS, *extra)) if c and c in data.columns]
    return data.drop_duplicates("run_id")[columns].reset_index(drop=True)


def with_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``run_id``: a frame without one (e.g. ``gradlab.watch``'s) is one run."""
    return frame if "run_id" in frame.columns else frame.assign(run_id=ONE_RUN)


def last_layer(frame: pd.DataFrame) -> pd.Series:
    """Each row's output layer: depth − 1, or, in a frame without ``depth`` (a model of the
    user's own), the highest layer recorded in its run."""
    if "depth" in frame.columns:
        return frame["depth"] - 1
    runs = frame["run_id"] if "run_id" in frame.columns else pd.Series(0, index=frame.index)
    return frame.groupby(runs)["layer"].transform("max")


def per_run(data: pd.DataFrame, by: Sequence[str], y: str, *extra: str | None) -> pd.DataFrame:
    """Mean of ``y`` per run and ``by`` (e.g. layer), with the run's config columns joined in."""
    means = data.groupby(["run_id", *by], sort=True, dropna=False)[y].mean().reset_index()
    return means.merge(run_info(data, *extra), on="run_id", how="left")


def varying_config(frame: pd.DataFrame) -> list[str]:
    """Config columns other than ``seed`` that take more than one value in ``frame``."""
    columns = [c for c in (*CONFIG_FIELDS, "width") if c != "seed" and c in frame.columns
               and frame[c].astype(str).nunique(dropna=False) > 1]
    if "widths" in columns and "width" in frame.columns and frame["width"].notna().all():
        columns.remove("widths")  # one width per run: widths follow from depth and width
    elif "widths" in columns and "width" in columns:
        columns.remove("width")
    return columns


def table_keys(frame: pd.DataFrame) -> list[str]:
    """What a summary groups by: activation, depth, then any other config that varies."""
    keys = [k for k in ("activation", "depth") if k in frame.columns]
    return keys + [c for c in varying_config(frame) if c not in keys]


def as_text(values: pd.Series) -> pd.Series:
    """Config values as label text; a missing value (no clipping, all training examples) is
    "none"."""
    return values.astype(object).where(values.notna(), "none").astype(str)


def with_setup(frame: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The hue column for figures: ``activation``, or a ``setup`` label such as
    "relu, init=kaiming_normal" when more than activation and depth vary across ``runs``. A
    label names only the values that differ from the most common one, to stay short, and
    ``init=default`` always: PyTorch's default init is a choice that a reader must see."""
    extras = [c for c in table_keys(runs) if c not in ("activation", "depth")]
    if not extras or frame.empty:
        return frame, "activation"
    label = as_text(frame["activation"]) if "activation" in frame else pd.Series(
        "", index=frame.index)
    for column in extras:
        usual = as_text(runs[column]).mode().iloc[0]  # ties: the first in sort order
        values = as_text(frame[column])
        named = (values != usual) | ((values == "default") & (column in NAMED_DEFAULTS))
        label = label + np.where(named, f", {column}=" + values, "")
    return frame.assign(setup=label.str.removeprefix(", ")), "setup"


def complete_only(grads: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The records of complete runs: a diverged run's partial records are no measure of its
    setup (summaries count it in ``diverged`` instead)."""
    if grads.empty or "status" not in runs:
        return grads
    return grads[grads["run_id"].isin(runs.loc[runs["status"] == "complete", "run_id"])]


def vanishing_ratios(grads: pd.DataFrame, *, y: str = "grad_weight_norm") -> pd.DataFrame:
    """Per run: ‖g_first‖/‖g_last‖, ``y`` of layer 0 over layer depth−1, taken per recorded step,
    then the median over steps (``vanishing_ratio``). Steps where the ratio is not finite and
    positive (a diverged run's last step) are left out and counted in ``dropped``."""
    grads = with_runs(grads)
    if "depth" not in grads.columns:  # a model of the user's own: its recorded layers
        grads = grads.assign(depth=last_layer(grads) + 1)
    keep = ["run_id", "step", y]
    first = grads.loc[grads["layer"] == 0, keep]
    last = grads.loc[grads["layer"] == grads["depth"] - 1, keep]
    pairs = first.merge(last, on=["run_id", "step"], suffixes=("_first", "_last"))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = pairs[f"{y}_first"].to_numpy(float) / pairs[f"{y}_last"].to_numpy(float)
    ok = np.isfinite(ratio) & (ratio > 0)
    pairs = pairs.assign(vanishing_ratio=np.where(ok, ratio, np.nan), ok=ok)
    per = pairs.groupby("run_id", sort=True).agg(
        vanishing_ratio=("vanishing_ratio", "median"), steps=("ok", "sum"),
        dropped=("ok", lambda s: int((~s).sum())))
    out = run_info(grads).merge(per.reset_index(), on="run_id", how="left")
    out["steps"] = out["steps"].fillna(0).astype(int)
    out["dropped"] = out["dropped"].fillna(0).astype(int)
    out["max_slope_product"] = SIGMOID_MAX_SLOPE ** (out["depth"] - 1)
    order = [c for c in (*table_keys(out), "seed", "run_id") if c in out.columns]
    return out.sort_values(order).reset_index(drop=True)


def stored_ratios(runs: pd.DataFrame, ratios: Sequence[float]) -> pd.DataFrame:
    """``vanishing_ratios`` of runs whose ratio was written at finish (status.json's
    ``vanishing_ratio``, one per row of ``runs``, a frame of ``load().runs``): the same rows,
    columns (but ``steps`` and ``dropped``) and order, without their records."""
    out = run_info(runs).assign(vanishing_ratio=np.asarray(ratios, dtype=float))
    out["max_slope_product"] = SIGMOID_MAX_SLOPE ** (out["depth"] - 1)
    order = [c for c in (*table_keys(out), "seed", "run_id") if c in out.columns]
    return out.sort_values(order).reset_index(drop=True)


def geometric_mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(np.exp(np.log(values).mean())) if len(values) else math.nan


def vanishing_table(ratios: pd.DataFrame, *, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Vanishing ratios per setup (default: activation × depth): the geometric mean over seeds
    (what ``vanishing_ratio_plot`` draws), min and max, ``max_slope_product`` (0.25^(depth−1),
    the product of σ′'s largest value over the layers), and how many runs there are and how
    many diverged."""
    by = list(by or table_keys(ratios))
    grouped = ratios.groupby(by, sort=True, dropna=False)
    table = grouped.agg(runs=("run_id", "count"), min=("vanishing_ratio", "min"),
                        max=("vanishing_ratio", "max"))
    table.insert(1, "geo_mean", grouped["vanishing_ratio"].apply(geometric_mean))
    depths = table.index.get_level_values("depth")
    table["max_slope_product"] = SIGMOID_MAX_SLOPE ** (depths - 1)
    if "status" in ratios.columns:
        table["diverged"] = grouped["status"].apply(lambda s: int((s == "diverged").sum()))
    return table.reset_index()


def final_accuracy(epochs: pd.DataFrame, *, split: str = "test") -> pd.DataFrame:
    """Per run: accuracy and loss of the last recorded epoch of ``split``."""
    rows = epochs[epochs["split"] == split].sort_values(["run_id", "epoch"])
    last = rows.groupby("run_id", sort=True).tail(1)[["run_id", "epoch", "accuracy", "loss"]]
    return last.merge(run_info(epochs), on="run_id", how="left").reset_index(drop=True)


def final_accuracy_table(epochs: pd.DataFrame, runs: pd.DataFrame | None = None, *,
                         by: Sequence[str] | None = None, split: str = "test") -> pd.DataFrame:
    """Final ``split`` accuracy per setup (default: activation × depth): mean and sd over the
    seeds of complete runs (``seeds`` of them). Diverged and failed runs are not in the mean (a
    diverged run has no final accuracy); with ``runs`` (``gradlab.load(...).runs``) they are
    counted in ``diverged`` / ``failed``, including runs that never finished an epoch."""
    finals = final_accuracy(epochs, split=split)
    by = list(by or table_keys(runs if runs is not None and not runs.empty else finals))
    complete = finals[finals["status"] == "complete"] if "status" in finals else finals
    table = complete.groupby(by, sort=True, dropna=False)["accuracy"].agg(
        seeds="count", mean="mean", sd="std")
    source = runs if runs is not None and not runs.empty else finals
    if "status" in source.columns:
        counts = source.groupby(by, sort=True, dropna=False)["status"].value_counts()
        counts = counts.unstack(fill_value=0)
        for status in ("diverged", "failed"):
            column = counts[status] if status in counts else 0 * counts.iloc[:, 0]
            table = table.join(column.rename(status), how="outer")
    table = table.reset_index()
    table["seeds"] = table["seeds"].fillna(0).astype(int)
    for status in ("diverged", "failed"):
        if status in table:
            table[status] = table[status].fillna(0).astype(int)
    return table


# -- the story in plain words --------------------------------------------------------------------

CHANCE = 0.15  # test accuracy at or below this is no better than guessing among 10 classes


def ratio_word(ratio: float) -> str:
    """What a vanishing ratio ‖g_first‖/‖g_last‖ means for the first layer's gradient."""
    if not ratio == ratio:
        return "not measured"
    if ratio < 0.01:
        return "vanishes"
    if ratio < 0.1:
        return "shrinks"
    return "grows (explodes)" if ratio > 100 else "is kept"


def setup_name(label: str) -> str:
    return label.replace("init=default", "init=default (PyTorch's)")


def verdict(grads: pd.DataFrame, epochs: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """The story of a results folder in plain words, one line per setup (activation and any
    config that varies, seeds averaged): its vanishing ratio and final test accuracy at each
    depth, and what they mean (complete runs only; depths where every run diverged are named).
    Built from the stored records, for the end of ``gradlab sweep`` and ``gradlab figures``
    and the top of the report."""
    if grads.empty or runs.empty or "depth" not in runs:
        return []
    grads = complete_only(grads, runs)
    if grads.empty:
        return []
    return verdict_of(vanishing_ratios(grads), final_accuracy(epochs) if not epochs.empty
                      else None, runs)


def verdict_of(ratios: pd.DataFrame, finals: pd.DataFrame | None,
               runs: pd.DataFrame) -> list[str]:
    """``verdict`` from the per-run numbers: ``vanishing_ratios`` of the complete runs' grads
    and ``final_accuracy`` of the epochs (None: no epoch rows), whether computed from the
    records or read from each run's status.json (``gradlab.summary.stored``)."""
    diverged = pd.Series(dtype=object)  # per setup: the depths where every run diverged
    if "status" in runs:
        labelled, hue = with_setup(runs, runs)
        lost = labelled.groupby([hue, "depth"])["status"].agg(
            lambda s: "diverged" in set(s) and "complete" not in set(s))
        lost = lost[lost].reset_index().sort_values("depth")
        diverged = lost.groupby(hue)["depth"].apply(list)
    ratios, hue = with_setup(ratios, runs)
    ratio = ratios.groupby([hue, "depth"])["vanishing_ratio"].apply(geometric_mean)
    accuracy = pd.Series(dtype=float)
    if finals is not None:
        finals, _ = with_setup(finals, runs)
        if "status" in finals:
            finals = finals[finals["status"] == "complete"]
        accuracy = finals.groupby([hue, "depth"])["accuracy"].mean()
    lines = []
    for setup in sorted(ratio.index.get_level_values(0).unique()):
        by_depth = ratio[setup].sort_index()
        word = ratio_word(by_depth.iloc[-1])
        # from the first depth where it is as bad as at the deepest one
        first = next(d for d, r in by_depth.items() if ratio_word(r) == word)
        where = "at every depth" if first == by_depth.index[0] and len(by_depth) > 1 else \
            f"from depth {first}" if first != by_depth.index[-1] else f"at depth {first}"
        steps = " → ".join(f"{v:.2g}" for v in by_depth)
        text = (f"{setup_name(str(setup))}: the first layer's gradient {word} {where} "
                f"(‖g_first‖/‖g_last‖ {steps} at depth "
                f"{', '.join(str(d) for d in by_depth.index)})")
        if setup in accuracy.index.get_level_values(0):
            acc = accuracy[setup].reindex(by_depth.index)
            marks = [("n/a" if a != a else f"{a:.0%}" + (" (chance)" if a <= CHANCE else ""))
                     for a in acc]
            text += f"; final test accuracy {' → '.join(marks)}"
        if setup in diverged.index:
            text += f"; every run diverged at depth {', '.join(map(str, diverged[setup]))}"
        lines.append(text + ".")
    sigmoid = sorted(set(ratios.loc[ratios["activation"] == "sigmoid", hue])) \
        if "activation" in ratios else []
    return lines + ([slope_product_line(ratio, sigmoid)] if sigmoid else [])


def slope_product_line(ratio: pd.Series, sigmoid: list) -> str:
    """The line that says what 0.25^(depth−1) is, beside the ratios of the sigmoid setups
    (``ratio``: geometric mean per setup and depth), and where they lie above it."""
    depths = sorted({d for setup in sigmoid for d in ratio[setup].index})
    products = " → ".join(f"{SIGMOID_MAX_SLOPE ** (d - 1):.2g}" for d in depths)
    above = []
    for setup in sigmoid:
        over = [d for d, r in ratio[setup].items() if r > SIGMOID_MAX_SLOPE ** (d - 1)]
        if over:
            above.append(f"{setup_name(str(setup))} at depth {', '.join(map(str, over))}")
    text = (f"0.25^(depth−1) ({products} at depth {', '.join(map(str, depths))}) is the "
            f"product of σ′'s largest value, 0.25, over the depth−1 sigmoid layers: the most "
            f"that σ′ alone lets through, not a limit on ‖g_first‖/‖g_last‖, which also "
            f"carries the weights' norms and each layer's inputs")
    if above:
        text += f"; the measured ratio is above it for {'; '.join(above)}"
    return text + "."
