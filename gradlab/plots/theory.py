"""Mean-field theory beside the measurement: each run's per-layer factor ‖∂L/∂z_l‖²/‖∂L/∂z_{l+1}‖²
at a step, and ``gradlab.theory``'s χ^(l) where the theory applies (``chi_table``,
``chi_by_layer``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from .. import theory
from ..tables import as_text, run_info, table_keys, with_runs
from .frames import check_columns
from .layout import own_panel, set_title
from .style import LAYER_LABEL, palette, paper_style

CONFIG = ("activation", "init", "bias_init", "depth", "widths")
NO_CONFIG = ("theory does not apply: the records hold no gradlab config (activation, init, "
             "bias_init, depth, widths): a model of your own")


def run_prediction(run: Mapping, input_second_moment: float | None
                   ) -> tuple[np.ndarray | None, float | None, str]:
    """(χ^(l) for l = 0 … depth−2, or None without ``input_second_moment``; χ₁ at q*, or None;
    a note, empty or saying why a value is missing) for one run's config."""
    if any(key not in run or pd.isna(run[key]) for key in CONFIG):
        return None, None, NO_CONFIG
    depth, activation = int(run["depth"]), str(run["activation"])
    widths = [int(w) for w in str(run["widths"]).split(",") if w]
    sizes = [784, *widths, 10]
    if activation not in theory.FUNCTIONS:
        return None, None, f"theory does not apply: no mean-field functions for {activation!r}"
    try:
        sw2, sb2 = theory.init_variances(str(run["init"]), str(run["bias_init"]), sizes,
                                         activation)
    except theory.TheoryDoesNotApply as e:
        return None, None, f"theory does not apply: {e}"
    layerwise = None if input_second_moment is None else theory.per_layer(
        activation, sw2, sb2, input_second_moment, depth).chi
    # χ₁ at q* of the hidden layers' σ_w², σ_b², where every hidden layer shares them
    hidden = set(zip(sw2[1:-1], sb2[1:-1]))
    if len(hidden) != 1:
        return layerwise, None, "no single χ₁: the hidden layers' σ_w², σ_b² differ"
    field = theory.mean_field(activation, *hidden.pop())
    return layerwise, field.chi1, "; ".join(field.notes)


def chi_table(grads: pd.DataFrame, *, step: int = 0,
              input_second_moment: float | None = None) -> pd.DataFrame:
    """One row per run and layer l (0 … depth−2): ``measured`` ‖∂L/∂z_l‖²/‖∂L/∂z_{l+1}‖² (from
    ``grad_output_norm`` at ``step``), ``predicted`` the mean-field χ^(l) from the input (NaN
    without ``input_second_moment`` = mean(x²) of the data, or where the theory does not
    apply), ``chi1`` χ₁ at q* (NaN where there is none) and ``note`` (why a value is missing).

    Args:
        grads: the ``grads`` frame of ``gradlab.load``.
        step: the recorded step (0: at initialisation, where the theory speaks).
        input_second_moment: mean(x²) over the data's features and examples (MNIST's first
            512 training images in [0, 1]: 0.107).
    """
    grads = with_runs(grads)
    check_columns(grads, "layer", "grad_output_norm", "step")
    rows = grads[grads["step"] == step]
    if rows.empty:
        raise ValueError(f"no records at step {step}")
    parts = []
    for run_id, part in rows.groupby("run_id", sort=True):
        norms = part.sort_values("layer")["grad_output_norm"].to_numpy(float)
        layers = part.sort_values("layer")["layer"].to_numpy()[:-1]
        info = part.iloc[0]
        layerwise, chi1, note = run_prediction(info, input_second_moment)
        predicted = (np.full(len(layers), np.nan) if layerwise is None
                     else layerwise[layers.astype(int)])
        with np.errstate(divide="ignore", invalid="ignore"):
            measured = norms[:-1] ** 2 / norms[1:] ** 2
        parts.append(pd.DataFrame({
            "run_id": run_id, "layer": layers, "measured": measured, "predicted": predicted,
            "chi1": np.nan if chi1 is None else chi1, "note": note}))
    table = pd.concat(parts, ignore_index=True)
    return table.merge(run_info(rows), on="run_id", how="left")


def with_label(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``setup`` label per run: the config that varies between runs, seeds
    apart (one line per setup, its seeds averaged), e.g. "init=normal_fan_in:1.5"; a single
    setup is named by its activation and depth."""
    runs = table.drop_duplicates("run_id")
    keys = [k for k in table_keys(runs) if k != "seed"]
    varying = [k for k in keys if runs[k].astype(str).nunique() > 1]
    keys = varying or keys
    if not keys:
        return table.assign(setup="run" if table["run_id"].nunique() == 1 else table["run_id"])
    label = pd.Series("", index=table.index)
    for i, key in enumerate(keys):
        label = label + ("" if i == 0 else ", ") + f"{key}=" + as_text(table[key])
    return table.assign(setup=label)


def chi_by_layer(grads: pd.DataFrame, *, step: int = 0,
                 input_second_moment: float | None = None, ax: Axes | None = None) -> Axes:
    """The per-layer factor ‖∂L/∂z_l‖²/‖∂L/∂z_{l+1}‖² at ``step`` against the layer l (log y),
    the geometric mean over seeds per setup (solid, dots), beside the mean-field prediction:
    χ^(l) from the input (dashed; needs ``input_second_moment``) and χ₁ at q* (dotted). A
    setup the theory does not fit says so in the title, and no line is drawn for it.

    Args:
        grads: the ``grads`` frame of ``gradlab.load``.
        input_second_moment: mean(x²) of the data (see ``chi_table``).
        ax: the Axes to draw on; None draws a figure of its own.

    Returns the Axes.
    """
    table = chi_table(grads, step=step, input_second_moment=input_second_moment)
    if ax is None:
        return own_panel(table, lambda panel: chi_by_layer(
            grads, step=step, input_second_moment=input_second_moment, ax=panel))
    table, hue = with_label(table), "setup"
    levels = sorted(table[hue].unique())
    colors = palette(levels)
    notes = []
    with paper_style():
        ax.set_yscale("log")
        ax.axhline(1.0, color="0.6", lw=0.6, zorder=0)
        for level in levels:
            part = table[table[hue] == level]
            shown = part[np.isfinite(part["measured"]) & (part["measured"] > 0)]
            mean = np.exp(np.log(shown["measured"]).groupby(shown["layer"]).mean())
            ax.plot(mean.index, mean.to_numpy(), marker="o", ms=2.5, color=colors[level])
            predicted = part.groupby("layer")["predicted"].first()
            if predicted.notna().any():
                ax.plot(predicted.index, predicted.to_numpy(), ls="--", lw=0.9,
                        color=colors[level])
            chi1 = part["chi1"].iloc[0]
            if math.isfinite(chi1):
                ax.axhline(chi1, ls=":", lw=0.9, color=colors[level])
            note = part["note"].iloc[0]
            if note:
                notes.append(f"{level}: {note}")
        ax.set(xlabel=LAYER_LABEL, ylabel="‖∂L/∂z_l‖² / ‖∂L/∂z_l₊₁‖²")
        handles = [Line2D([], [], color=c, marker="o", ms=3, label=k) for k, c in colors.items()]
        handles += [Line2D([], [], color="0.3", ls="--", label="mean field χ^(l) from the input"),
                    Line2D([], [], color="0.3", ls=":", label="mean field χ₁ at q*")]
        ax.legend(handles=handles, title=hue, fontsize=6, frameon=False)
        set_title(ax, f"Per-layer factor of ‖∂L/∂z‖² at step {step}, geometric mean over "
                      f"seeds", notes, width=ax.get_figure(root=True).get_figwidth())
    return ax


def trainability(runs: pd.DataFrame, *, multiple: float = 6.0, ax: Axes | None = None) -> Axes:
    """Schoenholz et al. (2017), Fig. 5: final test accuracy over σ_w² (x) and depth (y, log),
    the mean over seeds, with ``multiple`` × ξ_c (their 6ξ_c, the depth up to which nets
    train) from ``gradlab.theory`` drawn over it. σ_w² and σ_b² are each run's hidden layers'
    (``theory.init_variances``); all runs must share one activation and σ_b².

    Args:
        runs: the ``runs`` frame of ``gradlab.load`` (config columns and
            ``final_test_accuracy``).
        ax: the Axes to draw on; None draws a figure of its own.

    Returns the Axes.
    """
    check_columns(runs, *CONFIG, "final_test_accuracy")
    if ax is None:
        return own_panel(runs.assign(setup="runs"), lambda panel: trainability(
            runs, multiple=multiple, ax=panel))
    cells = []
    for run in runs.to_dict("records"):
        _, _, note = run_prediction(run, None)
        if note.startswith("theory does not apply"):
            raise ValueError(f"run {run.get('run_id')}: {note}")
        sizes = [784, *[int(w) for w in str(run["widths"]).split(",") if w], 10]
        sw2, sb2 = theory.init_variances(run["init"], run["bias_init"], sizes, run["activation"])
        cells.append((sw2[1], sb2[1], run["activation"], int(run["depth"]),
                      100 * run["final_test_accuracy"]))
    cells = pd.DataFrame(cells, columns=["sw2", "sb2", "activation", "depth", "accuracy"])
    cells["sw2"], cells["sb2"] = cells["sw2"].round(12), cells["sb2"].round(12)
    if cells["activation"].nunique() != 1 or cells["sb2"].nunique() != 1:
        raise ValueError("trainability needs runs of one activation and one σ_b²")
    activation, sb2 = cells["activation"].iloc[0], float(cells["sb2"].iloc[0])
    grid = cells.pivot_table(index="depth", columns="sw2", values="accuracy", aggfunc="mean")
    x, depths = grid.columns.to_numpy(float), grid.index.to_numpy(float)
    y = np.log2(depths)  # depth on a log axis drawn linear, so the ticks can name each depth
    with paper_style():
        mesh = ax.pcolormesh(_edges(x), _edges(y), grid.to_numpy(), cmap="viridis", vmin=0,
                             vmax=100, shading="flat")
        ax.get_figure(root=True).colorbar(mesh, ax=ax, label="final test accuracy (%)")
        fine = np.linspace(*_edges(x)[[0, -1]], 40)
        scales = [theory.mean_field(activation, s, sb2).xi_c for s in fine]
        with np.errstate(divide="ignore"):
            curve = np.log2([multiple * s if s is not None else np.nan for s in scales])
        ax.plot(fine, curve, color="white", lw=1.2, ls="--", label=f"{multiple:g} ξ_c (mean field)",
                path_effects=[patheffects.withStroke(linewidth=2.4, foreground="black")])
        ax.set_ylim(*_edges(y)[[0, -1]])
        ax.set_yticks(y, [f"{d:g}" for d in depths])
        ax.set_xticks(x, [f"{v:g}" for v in x], fontsize=6, rotation=60)
        ax.set(xlabel="σ_w²", ylabel="depth (Linear layers, log scale)")
        ax.legend(loc="upper right", fontsize=6, frameon=False)
        set_title(ax, f"{activation}, σ_b² = {sb2:g}: final test accuracy", [],
                  width=ax.get_figure(root=True).get_figwidth())
    return ax


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges half-way between sorted centres, the outer ones as far out as the inner."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def _deepest(grads: pd.DataFrame) -> pd.DataFrame:
    return grads[grads["depth"] == grads["depth"].max()] if "depth" in grads.columns else grads


# The figures of this module by name, each drawn from ``gradlab.load``'s results, for an
# experiment spec's [figures] (``chi_by_layer``: the deepest runs, χ₁ at q* only, since the
# records do not hold the data's mean(x²)).
THEORY_FIGURES = {
    "trainability": lambda results: trainability(results.runs).get_figure(root=True),
    "chi_by_layer": lambda results: chi_by_layer(_deepest(results.grads)).get_figure(root=True),
}
