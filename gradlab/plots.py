"""Seaborn figures of the gradient records (DESIGN, "Figures").

Each figure is a function of the tidy frames of ``gradlab.load`` with a seaborn-style signature,
``f(data, *, x=..., y=..., hue=..., ...)``; axes-level functions take ``ax=`` and return the Axes,
figure-level ones return a ``matplotlib.figure.Figure`` (made without pyplot, so nothing is left
open). The numbers behind the figures (per-run vanishing ratio, final accuracy) are in
``gradlab.tables`` (and importable from here). ``write_figures`` draws every figure of a results
folder; the same records give the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter, PercentFormatter

from .config import ConfigError
from .store import Results, StoreError, atomic_write, load, make_folder
from .tables import (  # noqa: F401  (final_accuracy_table, vanishing_table: re-exported)
    SIGMOID_BOUND,
    final_accuracy,
    final_accuracy_table,
    per_run,
    run_info,
    table_keys,
    vanishing_ratios,
    vanishing_table,
    with_setup,
)

LAYER_LABEL = "layer (input → output)"
CI = ("ci", 95)
BOOT_SEED = 0  # bootstrap CIs are drawn from a fixed seed, so figures are reproducible
DPI = 200
FORMATS = ("png", "pdf", "svg")
# Metadata that would differ between two drawings of the same records (dates, versions).
SAVE_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "Producer": None, "Creator": None},
    "svg": {"Date": None, "Creator": None},
}
WIDTH_SINGLE, WIDTH_DOUBLE = 3.4, 7.0  # inches: one and two columns of a paper
NORM_LABELS = {
    "grad_weight_norm": "‖∂L/∂W‖",
    "grad_bias_norm": "‖∂L/∂b‖",
    "grad_output_norm": "‖∂L/∂z‖",
    "weight_norm": "‖W‖",
    "update_ratio": "‖ΔW‖ / ‖W‖",
}
# Columns that are constant within a run, as ``gradlab.load`` joins them in.
MAX_LISTED = 4  # diverged runs named in a figure title before "+N more"
LEGEND_GUESS = 0.5  # inches for the legend row until it is measured
DIVERGED_COLOR = "crimson"


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Seaborn's "paper" context and "ticks" style plus deterministic SVG ids, for a block only."""
    rc = {
        "svg.hashsalt": "gradlab",
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
        "pdf.fonttype": 42,  # TrueType: text stays text in a paper's PDF
        "axes.titlesize": 7.5,
        "figure.titlesize": 8,
        "figure.labelsize": 8,
        "legend.title_fontsize": 7.5,
        "legend.fontsize": 7,
        "lines.linewidth": 1.0,
    }
    with sns.axes_style("ticks"), sns.plotting_context("paper", font_scale=0.85), \
            matplotlib.rc_context(rc):
        yield


# -- tidy helpers ----------------------------------------------------------------------------


def run_label(row) -> str:
    text = f"{getattr(row, 'activation', '?')} depth {getattr(row, 'depth', '?')} " \
           f"seed {getattr(row, 'seed', '?')}"
    step = getattr(row, "diverged_step", None)
    if getattr(row, "status", None) == "diverged" and step is not None and step == step:
        text += f" (step {int(step)})"
    return text


def run_notes(data: pd.DataFrame) -> list[str]:
    """Lines naming the diverged and failed runs in ``data`` (their records end early)."""
    if data.empty or "status" not in data.columns:
        return []
    runs = run_info(data).sort_values([c for c in ("activation", "depth", "seed", "run_id")
                                       if c in data.columns])
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
    return data if epoch is None else data[data["epoch"] == epoch]


def steps_text(epoch: int | None) -> str:
    return "all recorded steps" if epoch is None else f"steps of epoch {epoch}"


def levels(data: pd.DataFrame, column: str | None) -> list:
    return [] if column is None else sorted(data[column].dropna().unique().tolist())


def palette(values: Sequence, name: str = "colorblind") -> dict:
    return dict(zip(values, sns.color_palette(name, len(values)), strict=True))


# -- layout ----------------------------------------------------------------------------------


@dataclass
class Facets:
    """A figure of panels (top subfigure) and its legend row (bottom subfigure); ``panels``
    holds ``(ax, row_value, col_value, subset)``; heights are in inches."""

    fig: Figure
    grid: GridSpec
    top: SubFigure
    bottom: SubFigure
    main: float
    panels: list[tuple]


def facets(data: pd.DataFrame, row: str | None, col: str | None, *, sharex=True, sharey=True,
           row_order: Sequence | None = None, row_names: dict | None = None,
           panel_height: float = 1.1) -> Facets:
    """A Figure with one panel per (row, col) level of ``data``; see ``Facets``. Columns are
    named above the top row, rows at the right margin (``row_names`` overrides the text; an
    empty dict names none)."""
    rows = list(row_order) if row_order is not None else (levels(data, row) or [None])
    cols = levels(data, col) or [None]
    width = min(WIDTH_DOUBLE, max(WIDTH_SINGLE, 0.7 + 1.05 * len(cols)))
    main = 0.75 + panel_height * len(rows)
    fig = Figure(figsize=(width, main + LEGEND_GUESS), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer, to measure the legend in ``finish``
    grid = fig.add_gridspec(2, 1, height_ratios=[main, LEGEND_GUESS], left=0, right=1,
                            bottom=0, top=1, hspace=0)
    top, bottom = fig.add_subfigure(grid[0]), fig.add_subfigure(grid[1])
    axes = top.subplots(len(rows), len(cols), sharex=sharex, sharey=sharey, squeeze=False)
    chars = max(12, int(panel_height * 14))
    panels = []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            subset = data
            if r is not None:
                subset = subset[subset[row] == r]
            if c is not None:
                subset = subset[subset[col] == c]
            ax = axes[i, j]
            if i == 0 and c is not None:
                ax.set_title(facet_name(col, c))
            if j == len(cols) - 1 and r is not None:
                name = facet_name(row, r) if row_names is None else row_names.get(r, "")
                ax.annotate(wrap(name, chars), xy=(1.04, 0.5), xycoords="axes fraction",
                            rotation=270, ha="left", va="center",
                            fontsize=matplotlib.rcParams["axes.titlesize"])
            panels.append((ax, r, c, subset))
    return Facets(fig, grid, top, bottom, main, panels)


def wrap(text: str, chars: int) -> str:
    """``text`` in lines of at most ``chars``, never breaking a word such as init=normal:1.0."""
    return textwrap.fill(text, chars, break_long_words=False, break_on_hyphens=False)


def facet_name(column: str, value) -> str:
    if column in ("activation", "setup", "metric"):
        return str(value)
    return f"{column} {value}"


def finish(facet: Facets, title: str | None, notes: Sequence[str] = (), *,
           xlabel: str | None = None, ylabel: str | None = None, legend: dict | None = None,
           legend_title: str = "", marker: str | None = "o",
           extra: Sequence[Line2D] = ()) -> Figure:
    """Shared axis labels, one legend under all panels (one entry per ``legend`` level, then
    ``extra``), and a title that carries the notes."""
    if xlabel is not None:
        facet.top.supxlabel(xlabel)
    if ylabel is not None:
        facet.top.supylabel(ylabel)
    handles = [Line2D([], [], color=color, marker=marker, markersize=3, label=str(level))
               for level, color in (legend or {}).items()]
    title_text = None if title is None else set_title(facet.fig, title, notes,
                                                      width=facet.fig.get_figwidth())
    return fit(facet, [*handles, *extra], legend_title, title_text)


def fit(facet: Facets, handles: Sequence, legend_title: str, title_text=None) -> Figure:
    """Put the legend in the bottom subfigure, in as many columns as fit the width, and size the
    figure to the panels, the legend and the title, as measured.

    Constrained layout does not stack a figure's x label and an "outside" legend (they
    overlap), hence the legend's own subfigure.
    """
    fig = facet.fig
    tidy_log_axes(fig)
    renderer = fig.canvas.get_renderer()
    need = 0.05
    for ncols in range(min(len(handles), 5), 0, -1):
        box = facet.bottom.legend(handles=handles, title=legend_title, loc="center",
                                  ncols=ncols, frameon=False, columnspacing=1.0,
                                  handlelength=1.5, borderaxespad=0.0)
        extent = box.get_window_extent(renderer)
        if extent.width / fig.dpi <= fig.get_figwidth() - 0.1 or ncols == 1:
            need = extent.height / fig.dpi + 0.06
            break
        box.remove()
    title_height = 0.0
    if title_text is not None:
        title_height = title_text.get_window_extent(renderer).height / fig.dpi + 0.1
    facet.grid.set_height_ratios([facet.main, need])
    fig.set_figheight(facet.main + need + title_height)
    return fig


def set_title(target, title: str, notes: Sequence[str], *, width: float):
    """Title plus notes (diverged runs, dropped values), wrapped to the figure width; returns
    the Text."""
    chars = max(36, int(width * (13 if isinstance(target, Figure) else 12)))
    lines = [wrap(text, chars) for text in (title, *notes)]
    if isinstance(target, Figure):
        return target.suptitle("\n".join(lines))
    return target.set_title("\n".join(lines), fontsize=7.5)


def mark_diverged(ax: Axes, frame: pd.DataFrame, x: str, y: str,
                  last_of: Sequence[str] | None = None) -> bool:
    """Draw the points of diverged runs as a red ×: every point, or with ``last_of`` (e.g.
    ["layer"]) only each run's last one per group, where its records end."""
    if "status" not in frame.columns:
        return False
    bad = frame[frame["status"] == "diverged"]
    if bad.empty:
        return False
    if last_of is not None:
        bad = bad.sort_values(x, kind="stable").groupby(["run_id", *last_of]).tail(1)
    ax.scatter(bad[x], bad[y], marker="x", s=16, color=DIVERGED_COLOR, linewidths=0.9,
               zorder=5)
    return True


def diverged_handle() -> Line2D:
    return Line2D([], [], ls="", marker="x", color=DIVERGED_COLOR, label="diverged run")


def integer_ticks(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))


def layer_axis(ax: Axes, layers: pd.Series) -> None:
    """Integer ticks over the layers drawn (each of a few), with room around a single one."""
    values = sorted(layers.unique().tolist())
    if not values:
        return
    if len(values) <= 6:
        ax.set_xticks(values)
    else:
        integer_ticks(ax)
    ax.set_xlim(values[0] - 0.4, values[-1] + 0.4)


def tidy_log_axes(fig: Figure) -> None:
    """Label only the decades of a log axis that shows one (matplotlib labels the minor ticks
    of short ranges too, and they crowd a small panel)."""
    for ax in fig.axes:
        if ax.get_yscale() != "log":
            continue
        lo, hi = ax.get_ylim()
        if lo > 0 and math.floor(math.log10(hi)) >= math.ceil(math.log10(lo)):
            ax.yaxis.set_minor_formatter(NullFormatter())


def check_columns(data: pd.DataFrame, *columns: str | None) -> None:
    missing = [c for c in columns if c and c not in data.columns]
    if missing:
        raise ValueError(f"data has no column {missing[0]!r}: pass a frame of gradlab.load")


# -- figures: by layer -------------------------------------------------------------------------


def layer_figure(data, *, x, y, hue, col, epoch, log, errorbar, seed, title, ylabel,
                 hue_order=None, bound=None, bound_label=None) -> Figure:
    """Figures 1 and 4: ``y`` per run and layer (mean over the steps of ``epoch``), then its mean
    over seeds with a bootstrap CI, per ``hue``, one panel per ``col``."""
    check_columns(data, x, y, hue, col, "run_id", "epoch")
    with paper_style():
        rows, notes = finite(first_epoch(data, epoch), y, log=log)
        profile = per_run(rows, [x], y, hue, col)
        if profile.empty:
            raise ValueError(f"no finite {y} values to draw")
        colors = palette(hue_order or levels(profile, hue))
        facet = facets(profile, None, col, sharex=False, sharey=True)
        diverged = False
        for ax, _, _, part in facet.panels:
            if log:
                ax.set_yscale("log")  # before drawing: seaborn then averages log values
            if not part.empty:
                sns.lineplot(part, x=x, y=y, hue=hue, hue_order=list(colors), palette=colors,
                             marker="o", markersize=3, markeredgewidth=0, errorbar=errorbar,
                             seed=seed, legend=False, ax=ax)
                diverged |= mark_diverged(ax, part, x, y)
            if bound is not None:
                ax.axhline(bound, ls="--", lw=0.8, color="0.35", zorder=0)
            ax.set(xlabel="", ylabel="")
            layer_axis(ax, part[x])
        extra = [] if bound is None else [
            Line2D([], [], ls="--", lw=0.8, color="0.35", label=bound_label)]
        fig = finish(facet, title, [*run_notes(data), *notes], xlabel=LAYER_LABEL, ylabel=ylabel,
               legend=colors, legend_title=hue,
               extra=extra + ([diverged_handle()] if diverged else []))
    return fig


def mean_text(log: bool, errorbar) -> str:
    ci = f", {errorbar[1]}% CI" if isinstance(errorbar, tuple) and errorbar[0] == "ci" else ""
    # a no-break space keeps "95% CI" on one line when the title is wrapped
    return ("geometric mean" if log else "mean") + f" over seeds{ci}".replace("% CI", "%\u00a0CI")


def grad_norm_by_layer(data: pd.DataFrame, *, x: str = "layer", y: str = "grad_weight_norm",
                       hue: str = "activation", col: str = "depth", epoch: int | None = 1,
                       errorbar=CI, seed: int = BOOT_SEED,
                       hue_order: Sequence | None = None) -> Figure:
    """Figure 1: gradient norm by layer from input to output (log y), hue = activation, one
    panel per depth.

    Args:
        data: the ``grads`` frame of ``gradlab.load``.
        y: a norm column (``grad_weight_norm``, ``grad_output_norm``, ...).
        epoch: per run and layer, ``y`` is averaged over the recorded steps of this epoch
            (None: all steps); then the geometric mean over seeds is drawn with a bootstrap CI
            (``errorbar``, seaborn's ``seed``).
    """
    label = NORM_LABELS.get(y, y)
    return layer_figure(data, x=x, y=y, hue=hue, col=col, epoch=epoch, log=True,
                        errorbar=errorbar, seed=seed, hue_order=hue_order,
                        title=f"Gradient norm by layer: per run the mean over {steps_text(epoch)}; "
                              f"{mean_text(True, errorbar)}",
                        ylabel=f"gradient norm {label}")


def act_grad_by_layer(data: pd.DataFrame, *, x: str = "layer", y: str = "act_grad_mean",
                      hue: str = "activation", col: str = "depth", epoch: int | None = 1,
                      errorbar=CI, seed: int = BOOT_SEED,
                      hue_order: Sequence | None = None) -> Figure:
    """Figure 4: the measured attenuation, mean f′(z) per hidden layer, against the sigmoid
    bound 0.25 (dashed). Averaging as in ``grad_norm_by_layer`` (arithmetic over seeds); the
    output layer has no activation and is left out."""
    check_columns(data, x, "depth")
    hidden = data[data[x] < data["depth"] - 1]
    return layer_figure(hidden, x=x, y=y, hue=hue, col=col, epoch=epoch, log=False,
                        errorbar=errorbar, seed=seed, hue_order=hue_order, bound=SIGMOID_BOUND,
                        bound_label=f"max σ′ = {SIGMOID_BOUND}",
                        title=f"Mean f′ per hidden layer: per run the mean over "
                              f"{steps_text(epoch)}; {mean_text(False, errorbar)}",
                        ylabel="mean f′(z) over units and batch")


# -- figures: over training steps ------------------------------------------------------------


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


def steps_figure(data, *, x, y, hue, row, col, bins, log, title, ylabel,
                 row_names: dict | None = None, notes: Sequence[str] = (),
                 ylim: tuple[float, float] | None = None) -> Figure:
    """Figures 2 and 6: ``y`` over training steps, one line per ``hue`` (layer), panels
    ``row`` × ``col``; each line is the mean over seeds (geometric on a log axis) of each run's
    mean within a step bin."""
    check_columns(data, x, y, hue, row, col, "run_id")
    with paper_style():
        rows, dropped = finite(data, y, log=log)
        rows, width = bin_steps(rows, x, bins)
        binned = per_run(rows, [x, hue], y, row, col)
        if binned.empty:
            raise ValueError(f"no finite {y} values to draw")
        colors = palette(levels(binned, hue), "viridis")
        # Rows share a y range, not the whole figure: one exploding run must not flatten the rest.
        facet = facets(binned, row, col, sharex=True, sharey="row", row_names=row_names,
                       panel_height=1.0)
        diverged = False
        for ax, _, _, part in facet.panels:
            if log:
                ax.set_yscale("log")
            if not part.empty:
                # Averaged over seeds here, not by seaborn: its per-point groupby is slow for
                # thousands of steps, and there is no CI to bootstrap.
                sns.lineplot(over_seeds(part, [hue, x], y, log), x=x, y=y, hue=hue,
                             hue_order=list(colors), palette=colors, estimator=None,
                             legend=False, lw=0.8, ax=ax)
                diverged |= mark_diverged(ax, part, x, y, last_of=[hue])
            ax.set(xlabel="", ylabel="")
            if ylim is not None:
                ax.set_ylim(*ylim)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
        per = f"mean per {width}-step bin" if width > 1 else "every recorded step"
        fig = finish(facet, title, [*run_notes(data), *notes, *dropped],
               xlabel=f"training step ({per})", ylabel=ylabel, legend=colors,
               legend_title=LAYER_LABEL if hue == "layer" else hue, marker=None,
               extra=[diverged_handle()] if diverged else [])
    return fig


def grad_norm_over_steps(data: pd.DataFrame, *, x: str = "step", y: str = "grad_weight_norm",
                         hue: str = "layer", row: str = "activation", col: str = "depth",
                         bins: int | None = 100) -> Figure:
    """Figure 2: gradient norm over training steps (log y), one line per layer, panels
    activation × depth. Each line is the geometric mean over seeds; ``bins`` caps the points
    per line (None: every recorded step)."""
    label = NORM_LABELS.get(y, y)
    return steps_figure(data, x=x, y=y, hue=hue, row=row, col=col, bins=bins, log=True,
                        title=f"Gradient norm {label} per layer over training "
                              f"(geometric mean over seeds)",
                        ylabel=f"gradient norm {label}")


def inactive_fraction(grads: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Hidden-layer rows with ``inactive_frac``: ``saturated_frac`` for runs that record it
    (sigmoid, tanh, softsign), else ``dead_frac`` (relu family), and ``inactive_kind`` naming
    which. Runs with neither (e.g. gelu) are left out and named in the returned notes."""
    hidden = grads[grads["layer"] < grads["depth"] - 1]
    by_run = hidden["run_id"]
    has_sat = hidden["saturated_frac"].notna().groupby(by_run).transform("any")
    has_dead = hidden["dead_frac"].notna().groupby(by_run).transform("any")
    kind = np.where(has_sat, "saturated", np.where(has_dead, "dead", ""))
    value = np.where(has_sat, hidden["saturated_frac"], hidden["dead_frac"])
    out = hidden.assign(inactive_frac=value, inactive_kind=kind)
    missing = sorted(out.loc[out["inactive_kind"] == "", "activation"].astype(str).unique())
    notes = [f"no saturation or dead-unit measure for {', '.join(missing)}"] if missing else []
    return out[out["inactive_kind"] != ""], notes


def saturation_over_steps(data: pd.DataFrame, *, x: str = "step", hue: str = "layer",
                          row: str = "activation", col: str = "depth",
                          bins: int | None = 100) -> Figure:
    """Figure 6: fraction of saturated units (sigmoid, tanh, softsign: f′ < 0.05·max f′) or dead
    units (relu family: zero output for the whole batch) per hidden layer over training, panels
    activation × depth; mean over seeds per step bin."""
    check_columns(data, "saturated_frac", "dead_frac", "layer", "depth")
    frame, notes = inactive_fraction(data)
    kinds = frame.drop_duplicates(row).set_index(row)["inactive_kind"].to_dict() if row else {}
    fig = steps_figure(frame, x=x, y="inactive_frac", hue=hue, row=row, col=col, bins=bins,
                       log=False, title="Saturated units (f′ < 0.05·max f′) or dead units "
                                        "(0 for the whole batch) per layer, mean over seeds",
                       ylabel="fraction of units",
                       row_names={r: f"{r}: {k} units" for r, k in kinds.items()}, notes=notes,
                       ylim=(-0.03, 1.03))
    return fig


# -- figure 3: vanishing ratio against depth -------------------------------------------------


def vanishing_ratio_plot(data: pd.DataFrame, *, x: str = "depth", y: str = "vanishing_ratio",
                         hue: str = "activation", ax: Axes | None = None, errorbar=CI,
                         seed: int = BOOT_SEED, hue_order: Sequence | None = None) -> Axes:
    """Figure 3: the vanishing ratio ‖g_first‖/‖g_last‖ against depth per ``hue`` (log y): the
    geometric mean over seeds with a bootstrap CI, each run as a dot (diverged runs as ×), and
    the tutorial's 0.25^(depth−1) bound dashed.

    Args:
        data: the ``grads`` frame of ``gradlab.load``, or ``vanishing_ratios(grads)``.
    """
    ratios = data if y in data.columns else vanishing_ratios(data)
    check_columns(ratios, x, y, hue)
    with paper_style():
        if ax is None:
            import matplotlib.pyplot as plt

            ax = plt.figure(figsize=(WIDTH_SINGLE, 2.6), layout="constrained").add_subplot()
        shown, notes = finite(ratios, y, log=True)
        colors = palette(hue_order or levels(shown, hue))
        ax.set_yscale("log")
        sns.lineplot(shown, x=x, y=y, hue=hue, hue_order=list(colors), palette=colors,
                     marker="o", markersize=4, markeredgewidth=0, errorbar=errorbar, seed=seed,
                     ax=ax, legend=False)
        for level, color in colors.items():
            runs = shown[shown[hue] == level]
            ax.scatter(runs[x], runs[y], s=6, color=color, alpha=0.45, linewidths=0, zorder=3)
        handles = [Line2D([], [], color=c, marker="o", markersize=3, label=str(k))
                   for k, c in colors.items()]
        if "status" in shown.columns and (shown["status"] == "diverged").any():
            diverged = shown[shown["status"] == "diverged"]
            ax.scatter(diverged[x], diverged[y], marker="x", s=18, color="crimson", zorder=4)
            handles.append(Line2D([], [], ls="", marker="x", color="crimson",
                                  label="diverged run"))
        depths = np.arange(int(shown[x].min()), int(shown[x].max()) + 1) if len(shown) else []
        ax.plot(depths, SIGMOID_BOUND ** (np.asarray(depths) - 1.0), ls="--", lw=0.9,
                color="0.3", label="bound")
        handles.append(Line2D([], [], ls="--", color="0.3", label="0.25^(depth−1)"))
        ax.legend(handles=handles, title=hue, frameon=False, fontsize=6.5, loc="best")
        ax.set_xticks(levels(shown, x))
        ax.set_xlabel("depth (Linear layers)")
        ax.set_ylabel("‖∂L/∂W₀‖ / ‖∂L/∂W_last‖\n(median over steps per run)")
        set_title(ax, f"Vanishing ratio ({mean_text(True, errorbar)})",
                  [*run_notes(ratios), *notes], width=ax.get_figure(root=True).get_figwidth())
    return ax


# -- figure 5: accuracy and loss by epoch ----------------------------------------------------


def accuracy_by_epoch(data: pd.DataFrame, *, x: str = "epoch",
                      y: Sequence[str] = ("accuracy", "loss"), hue: str = "activation",
                      col: str = "depth", split: str = "test", errorbar=CI,
                      seed: int = BOOT_SEED, hue_order: Sequence | None = None,
                      runs: pd.DataFrame | None = None) -> Figure:
    """Figure 5: ``split`` accuracy and loss by epoch, one row per metric, hue = activation,
    one panel per depth; mean over seeds with a bootstrap CI.

    Args:
        data: the ``epochs`` frame of ``gradlab.load``.
        runs: its ``runs`` frame, to name in the title also the diverged and failed runs that
            never finished an epoch (they have no rows in ``data``).
    """
    y = [y] if isinstance(y, str) else list(y)
    check_columns(data, x, hue, col, "split", *y)
    with paper_style():
        rows = data[data["split"] == split]
        ids = [c for c in dict.fromkeys(["run_id", x, hue, col, "status"]) if c in data]
        long = rows.melt(id_vars=ids, value_vars=y, var_name="metric", value_name="value")
        long, notes = finite(long, "value", label=f"{split} {'/'.join(y)}")
        if long.empty:
            raise ValueError(f"no finite {split} {', '.join(y)} values to draw")
        colors = palette(hue_order or levels(long, hue))
        facet = facets(long, "metric", col, sharex=True, sharey="row", row_order=y,
                       row_names={}, panel_height=1.0)
        first_col = (levels(long, col) or [None])[0]
        diverged = False
        for ax, metric, c, part in facet.panels:
            if not part.empty:
                sns.lineplot(part, x=x, y="value", hue=hue, hue_order=list(colors),
                             palette=colors, marker="o", markersize=3, markeredgewidth=0,
                             errorbar=errorbar, seed=seed, legend=False, ax=ax)
                diverged |= mark_diverged(ax, part, x, "value", last_of=[])
            if metric == "accuracy":
                ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            integer_ticks(ax)
            unit = {"accuracy": " (%)", "loss": " (cross-entropy)"}.get(metric, "")
            ax.set(xlabel="", ylabel=f"{split} {metric}{unit}" if c == first_col else "")
        fig = finish(facet, f"{split.capitalize()} accuracy and loss by epoch "
                    f"({mean_text(False, errorbar)})",
               [*run_notes(data if runs is None else runs), *notes], xlabel="epoch",
               ylabel="", legend=colors,
               legend_title=hue, extra=[diverged_handle()] if diverged else [])
    return fig


# -- writing a results folder's figures ------------------------------------------------------

FIGURES = ("grad_norm_by_layer", "grad_norm_over_steps", "vanishing_ratio", "act_grad_by_layer",
           "accuracy_by_epoch", "saturation_over_steps")
CAPTIONS = {
    "grad_norm_by_layer": "Gradient norm by layer (first epoch)",
    "grad_norm_over_steps": "Gradient norm per layer over training",
    "vanishing_ratio": "Vanishing ratio ‖g_first‖/‖g_last‖ against depth",
    "act_grad_by_layer": "Mean f′ per layer against the 0.25 bound",
    "accuracy_by_epoch": "Test accuracy and loss by epoch",
    "saturation_over_steps": "Saturated / dead units per layer over training",
}


@dataclass
class Prepared:
    """A results folder's frames, sorted deterministically, with the figures' ``hue`` column
    and the numbers that both the figures and the report show (computed once)."""

    grads: pd.DataFrame
    epochs: pd.DataFrame
    runs: pd.DataFrame
    hue: str
    problems: list[str]

    @property
    def hue_order(self) -> list:
        """Every hue level of every run, so that a level has one colour in every figure."""
        return levels(self.runs, self.hue)

    @cached_property
    def ratios(self) -> pd.DataFrame:
        return vanishing_ratios(self.grads) if not self.grads.empty else pd.DataFrame()

    @cached_property
    def accuracy(self) -> pd.DataFrame:
        if self.epochs.empty:
            return pd.DataFrame()
        return final_accuracy_table(self.epochs, self.runs)


def prepare(results: Results, where: str | os.PathLike = "this results folder") -> Prepared:
    """Sort the frames of ``gradlab.load`` and add the hue column; raises StoreError when
    there are no runs (``where`` names the folder in the message)."""
    if results.runs.empty:
        raise StoreError(f"{where} holds no runs: nothing to draw")
    grads, epochs = results.grads, results.epochs
    if not grads.empty:
        grads = grads.sort_values(["run_id", "step", "layer"], kind="stable")
    if not epochs.empty:
        epochs = epochs.sort_values(["run_id", "epoch", "split"], kind="stable")
    runs = results.runs.sort_values("run_id", kind="stable").reset_index(drop=True)
    grads, hue = with_setup(grads.reset_index(drop=True), runs)
    epochs, _ = with_setup(epochs.reset_index(drop=True), runs)
    runs, _ = with_setup(runs, runs)
    return Prepared(grads, epochs, runs, hue, list(results.problems))


def vanishing_figure(ratios: pd.DataFrame, hue: str = "activation",
                     hue_order: Sequence | None = None) -> Figure:
    """Figure 3 as a single-column figure, its legend under the axes rather than on the data."""
    with paper_style():
        facet = facets(ratios, None, None, panel_height=1.9)
        ax = vanishing_ratio_plot(ratios, hue=hue, hue_order=hue_order, ax=facet.panels[0][0])
        legend = ax.get_legend()
        handles, title = legend.legend_handles, legend.get_title().get_text()
        legend.remove()
        return fit(facet, handles, title)


def draw(name: str, data: Prepared) -> Figure:
    """Draw figure ``name`` (one of ``FIGURES``) from prepared frames."""
    hue, order = data.hue, data.hue_order
    if name == "grad_norm_by_layer":
        return grad_norm_by_layer(data.grads, hue=hue, hue_order=order)
    if name == "grad_norm_over_steps":
        return grad_norm_over_steps(data.grads, row=hue)
    if name == "vanishing_ratio":
        return vanishing_figure(data.ratios, hue=hue, hue_order=order)
    if name == "act_grad_by_layer":
        return act_grad_by_layer(data.grads, hue=hue, hue_order=order)
    if name == "accuracy_by_epoch":
        return accuracy_by_epoch(data.epochs, hue=hue, hue_order=order, runs=data.runs)
    if name == "saturation_over_steps":
        return saturation_over_steps(data.grads, row=hue)
    raise ConfigError(f"figure {name!r} is unknown: one of {', '.join(FIGURES)}")


def figures(data: Prepared, only: Sequence[str] | None = None) -> Iterator[tuple[str, Figure]]:
    """Draw the figures of prepared results (or ``only`` those), skipping with a warning any
    whose records are missing (e.g. runs recorded with --log-every 0)."""
    for name in check_names(only):
        source = data.epochs if name == "accuracy_by_epoch" else data.grads
        if source.empty:
            warnings.warn(f"figure {name} skipped: no records for it", stacklevel=2)
            continue
        try:
            yield name, draw(name, data)
        except ValueError as e:
            warnings.warn(f"figure {name} skipped: {e}", stacklevel=2)


def check_names(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(FIGURES)
    unknown = [n for n in only if n not in FIGURES]
    if unknown:
        raise ConfigError(f"figure {unknown[0]!r} is unknown: one of {', '.join(FIGURES)}")
    return [n for n in FIGURES if n in only]


def freeze_layout(fig: Figure) -> None:
    """Lay the figure out once, then pin every Axes at its position rounded to 1e-6 of the
    figure and turn the layout engine off. Constrained layout's solver can differ between two
    runs in the last bits of a position, and SVG clip-path ids hash those bits."""
    if fig.get_layout_engine() is None:
        return
    fig.draw_without_rendering()
    for ax in fig.axes:
        ax.set_position(np.round(ax.get_position().bounds, 6).tolist())
    fig.set_layout_engine("none")


def render(fig: Figure, fmt: str) -> bytes:
    """The figure's file in ``fmt`` (png, pdf, svg), without dates or versions in it."""
    buffer = io.BytesIO()
    with paper_style():  # svg.hashsalt is read while saving
        freeze_layout(fig)
        fig.savefig(buffer, format=fmt, dpi=DPI, metadata=SAVE_METADATA[fmt])
    return buffer.getvalue()


def check_formats(formats: Sequence[str]) -> list[str]:
    formats = [f.strip().lower() for f in formats if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"format {bad[0] if bad else ''!r} is invalid: one or more of "
                          f"{', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def write_figures(results_dir: str | os.PathLike, formats: Sequence[str] = ("png",),
                  only: Sequence[str] | None = None) -> list[Path]:
    """Draw the figures of a results folder into ``results_dir/figures/NAME.FORMAT``.

    Args:
        results_dir: a folder made by gradlab (``<dir>/runs/<run_id>/``) or one run folder.
        formats: any of png, pdf, svg; the same records give the same bytes.
        only: figure names (``FIGURES``) to draw; all when None.

    Returns the paths written. Problems that ``gradlab.load`` reports are warnings.
    """
    formats = check_formats(formats)
    check_names(only)
    data = prepare(load(results_dir), results_dir)
    if data.grads.empty and data.epochs.empty:
        raise StoreError(f"{results_dir}: no finished run has records: nothing to draw")
    out = make_folder(Path(results_dir) / "figures")
    paths = []
    for name, fig in figures(data, only):
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            data = render(fig, fmt)
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
            paths.append(path)
    return paths
