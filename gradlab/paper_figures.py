"""Figures of the paper experiments: distributions per layer (Glorot & Bengio 2010: histograms,
Figs. 6-8; percentiles over training, Figs. 2-3) and per-layer profiles at initialisation
(Nielsen ch. 5's speed of learning; He et al. 2015's backward variance).

Figure-level functions of the tidy frames of ``gradlab.load`` (``.dists``, ``.grads``); each
returns a Figure, one panel per value of ``col`` (no panels when ``col`` is None or absent).
``write_paper_figures`` draws the named ones into ``figures/`` with ``gradlab.plots.render``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plots.files import render
from .plots.style import WIDTH_DOUBLE, palette, paper_style
from .plots.theory import THEORY_FIGURES
from .store import atomic_write, make_folder
from .tables import with_setup

QUANTITY_LABELS = {"activation": "activation value f(z)", "grad_output": "∂L/∂z",
                   "grad_weight": "∂L/∂W entries"}
PANEL_HEIGHT = 2.1


def panels(data: pd.DataFrame, col: str | None) -> list:
    return sorted(data[col].unique(), key=str) if col and col in data.columns else [None]


def panel_grid(n: int, title: str) -> tuple[Figure, list]:
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH_DOUBLE, PANEL_HEIGHT * nrows + 0.4),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def hidden_rows(data: pd.DataFrame) -> pd.DataFrame:
    """The rows of hidden layers (all but each run's last layer; ``depth`` where joined in)."""
    if "depth" in data.columns:
        return data[data["layer"] < data["depth"] - 1]
    last = data.groupby("run_id")["layer"].transform("max") if "run_id" in data else \
        data["layer"].max()
    return data[data["layer"] < last]


def first_runs(data: pd.DataFrame, col: str | None) -> pd.DataFrame:
    """Per panel, the rows of its run with the lowest seed (a histogram is one run's)."""
    if "run_id" not in data.columns:
        return data
    keys = [col] if col and col in data.columns else []
    order = ["seed", "run_id"] if "seed" in data.columns else ["run_id"]
    runs = data.drop_duplicates("run_id").sort_values([*keys, *order])
    chosen = runs.groupby(keys, sort=True).head(1)["run_id"] if keys else runs["run_id"].head(1)
    return data[data["run_id"].isin(set(chosen))]


def dist_histograms(data: pd.DataFrame, *, quantity: str = "activation", step: int = 0,
                    hue: str = "layer", col: str | None = "setup") -> Figure:
    """Histograms of ``quantity`` per layer at ``step`` (density, one line per layer), one panel
    per ``col``; each panel shows one run (its lowest seed), as Glorot & Bengio's Figs. 6-8."""
    rows = data[(data["quantity"] == quantity) & (data["stat"] == "count")
                & (data["step"] == step)]
    if rows.empty:
        raise ValueError(f"no {quantity} histograms at step {step}")
    rows = first_runs(rows, col)
    values = panels(rows, col)
    colors = palette(sorted(rows[hue].unique()), "viridis")
    fig, axes = panel_grid(len(values), f"Histograms of {QUANTITY_LABELS[quantity]} per layer "
                                        f"at step {step} (one run per panel)")
    for ax, value in zip(axes, values, strict=True):
        part = rows if value is None else rows[rows[col] == value]
        for level, group in part.groupby(hue, sort=True):
            group = group.sort_values("bin_lo")
            width = (group["bin_hi"] - group["bin_lo"]).to_numpy()
            density = group["value"].to_numpy() / group["value"].sum() / width
            centers = ((group["bin_lo"] + group["bin_hi"]) / 2).to_numpy()
            ax.plot(centers, density, color=colors[level], label=f"{hue} {level}")
        ax.set_title("" if value is None else str(value))
        ax.set_xlabel(QUANTITY_LABELS[quantity])
        ax.set_ylabel("density")
    axes[0].legend(frameon=False)
    return fig


def dist_percentiles(data: pd.DataFrame, *, quantity: str = "activation", hue: str = "layer",
                     col: str | None = "setup") -> Figure:
    """Median of ``quantity`` per layer over training (line), its 16-84 % band (shaded) and
    its 2 and 98 % percentiles (dotted), mean over seeds, one panel per ``col``: Glorot &
    Bengio's Figs. 2-3."""
    rows = data[(data["quantity"] == quantity) & (data["stat"] == "quantile")]
    if rows.empty:
        raise ValueError(f"no {quantity} quantiles")
    keys = [k for k in (col, hue) if k and k in rows.columns]
    levels = rows.assign(q=rows["q"].round(4)).groupby([*keys, "step", "q"], sort=True)[
        "value"].mean().unstack("q").reset_index()
    values = panels(levels, col)
    colors = palette(sorted(levels[hue].unique()), "viridis")
    fig, axes = panel_grid(len(values), f"Percentiles of {QUANTITY_LABELS[quantity]} per "
                                        f"layer over training (median, 16-84 %, 2 and 98 %)")
    for ax, value in zip(axes, values, strict=True):
        part = levels if value is None else levels[levels[col] == value]
        for level, group in part.groupby(hue, sort=True):
            x = group["step"].to_numpy()
            color = colors[level]
            ax.fill_between(x, group[0.16], group[0.84], color=color, alpha=0.15, lw=0)
            ax.plot(x, group[0.5], color=color, label=f"{hue} {level}")
            for q in (0.02, 0.98):
                ax.plot(x, group[q], color=color, ls=":", lw=0.7)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title("" if value is None else str(value))
        ax.set_xlabel("step")
        ax.set_ylabel(QUANTITY_LABELS[quantity])
    axes[0].legend(frameon=False, fontsize=6)
    return fig


def speed_of_learning(grads: pd.DataFrame, *, y: str = "grad_bias_norm", step: int = 0,
                      hue: str = "depth") -> Figure:
    """Nielsen's "speed of learning" ‖∂C/∂b‖ of each hidden layer at ``step``, one line per
    ``hue`` (network), mean over seeds with each seed's value as a dot."""
    rows = hidden_rows(grads[grads["step"] == step])
    if rows.empty:
        raise ValueError(f"no records at step {step}")
    if hue not in rows.columns:
        rows = rows.assign(**{hue: "all"})
    fig, axes = panel_grid(1, f"Speed of learning ‖∂C/∂b‖ of each hidden layer at step {step}")
    ax = axes[0]
    colors = palette(sorted(rows[hue].unique()))
    for level, group in rows.groupby(hue, sort=True):
        layer = group["layer"] + 1
        ax.scatter(layer, group[y], s=6, color=colors[level], alpha=0.5, lw=0)
        mean = group.groupby("layer")[y].mean()
        ax.plot(mean.index + 1, mean.to_numpy(), marker="o", ms=3, color=colors[level],
                label=f"{hue} {level}")
    ax.set_yscale("log")
    ax.set_xlabel("hidden layer (1 = next to the input)")
    ax.set_ylabel("‖∂C/∂b‖")
    ax.set_xticks(sorted((rows["layer"] + 1).unique()))
    ax.legend(frameon=False)
    return fig


def backward_variance(grads: pd.DataFrame, runs: pd.DataFrame, *, step: int = 0,
                      hue: str = "setup") -> Figure:
    """Variance of ∂L/∂z per unit by layer at ``step`` (‖∂L/∂z‖² over the layer's units),
    relative to the last hidden layer's, geometric mean over seeds; with He et al.'s
    predictions 2^-(L-1-l) for Xavier's init in a ReLU net (dashed) and 1 for theirs."""
    rows = grads[(grads["step"] == step) & (grads["layer"] < grads["depth"] - 1)].copy()
    if rows.empty:
        raise ValueError(f"no records at step {step}")
    widths = {r: [int(w) for w in str(ws).split(",")] for r, ws in
              runs[["run_id", "widths"]].itertuples(index=False)}
    units = [widths[r][layer] for r, layer in zip(rows["run_id"], rows["layer"], strict=True)]
    rows["var"] = rows["grad_output_norm"] ** 2 / np.asarray(units)
    last = rows[rows["layer"] == rows["depth"] - 2].set_index("run_id")["var"]
    rows["relative"] = rows["var"] / rows["run_id"].map(last)
    rows, hue = with_setup(rows, runs) if hue == "setup" else (rows, hue)
    fig, axes = panel_grid(1, f"Variance of ∂L/∂z by layer at step {step}, relative to the "
                              f"last hidden layer")
    ax = axes[0]
    colors = palette(sorted(rows[hue].unique()))
    for level, group in rows.groupby(hue, sort=True):
        mean = np.exp(np.log(group["relative"]).groupby(group["layer"]).mean())
        ax.plot(mean.index, mean.to_numpy(), marker="o", ms=2.5, color=colors[level],
                label=str(level))
    top = int(rows["layer"].max())
    layers = np.arange(top + 1)
    ax.plot(layers, 0.5 ** (top - layers), color="grey", ls="--", lw=0.8,
            label="He et al.: 2^-(L-1-l) (Xavier)")
    ax.axhline(1.0, color="grey", ls=":", lw=0.8, label="He et al.: flat (Kaiming)")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = next to the input)")
    ax.set_ylabel("Var(∂L/∂z) / Var at the last hidden layer")
    ax.legend(frameon=False, fontsize=6)
    return fig


PAPER_FIGURES = ("activation_histograms", "grad_output_histograms", "grad_weight_histograms",
                 "activation_percentiles", "speed_of_learning", "backward_variance",
                 *THEORY_FIGURES)  # (the mean-field theory beside the measurement)


def draw_paper_figure(name: str, results) -> Figure:
    """Draw the paper figure ``name`` (``PAPER_FIGURES``) from ``gradlab.load``'s results."""
    if name in THEORY_FIGURES:
        return THEORY_FIGURES[name](results)
    dists = results.dists
    if name.endswith(("_histograms", "_percentiles")):
        if dists.empty:
            raise ValueError("no distribution records (set dist_every)")
        dists, col = with_setup(dists, results.runs)
        col = col if col == "setup" else ("activation" if dists["activation"].nunique() > 1
                                          else None)
        quantity = name.rsplit("_", 1)[0]
        if quantity == "grad_output":  # hidden layers, as Glorot's Fig. 7: the output's
            dists = hidden_rows(dists)  # softmax error is on another scale
        if name.endswith("_histograms"):
            return dist_histograms(dists, quantity=quantity, col=col)
        return dist_percentiles(dists, quantity=quantity, col=col)
    if name == "speed_of_learning":
        return speed_of_learning(results.grads)
    hue = "init" if results.runs["init"].nunique() > 1 else "setup"
    return backward_variance(results.grads, results.runs, hue=hue)


def write_paper_figures(results, results_dir: str | os.PathLike, names: Sequence[str],
                        formats: Sequence[str] = ("png",)) -> list[Path]:
    """Draw the named paper figures into ``results_dir/figures/NAME.FORMAT``."""
    out = make_folder(Path(results_dir) / "figures")
    paths = []
    for name in names:
        with paper_style():
            fig = draw_paper_figure(name, results)
        for fmt in formats:
            data = render(fig, fmt)
            path = out / f"{name}.{fmt}"
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
            paths.append(path)
        plt.close(fig)
    return paths
