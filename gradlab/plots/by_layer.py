"""Figures 1 and 4: a quantity per layer from input to output, one panel per depth."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..activations import ACTIVATIONS
from ..tables import per_run, with_runs
from .frames import (
    by_setup,
    check_columns,
    facet_column,
    finite,
    first_epoch,
    hidden_rows,
    most_runs,
    run_notes,
    steps_text,
)
from .layout import diverged_handle, facets, finish, layer_axis, mark_diverged
from .style import (
    BOOT_SEED,
    CI,
    LAYER_LABEL,
    NORM_LABELS,
    hue_colors,
    mean_text,
    palette_of,
    paper_style,
)


def layer_figure(data, *, x, y, hue, col, epoch, log, errorbar, seed, title, ylabel,
                 hue_order=None, lines=None) -> Figure:
    """Figures 1 and 4: ``y`` per run and layer (mean over the steps of ``epoch``), then its mean
    over seeds with a bootstrap CI, per ``hue``, one panel per ``col``. ``title`` is completed
    with how the runs are averaged; ``lines(data)`` gives the dashed reference lines as
    ``{label: y}``."""
    data = with_runs(data)
    hue, col = facet_column(data, hue), facet_column(data, col)
    data, hue = by_setup(data, hue, col)
    check_columns(data, x, y)
    with paper_style():
        rows, notes = finite(first_epoch(data, epoch), y, log=log)
        profile = per_run(rows, [x], y, hue, col)
        if profile.empty:
            raise ValueError(f"no finite {y} values to draw")
        colors = palette_of(profile, hue, hue_order)
        facet = facets(profile, None, col, sharex=False, sharey=True)
        references = lines(profile) if lines is not None else {}
        diverged = False
        for ax, _, _, part in facet.panels:
            if log:
                ax.set_yscale("log")  # before drawing: seaborn then averages log values
            if not part.empty:
                sns.lineplot(part, x=x, y=y, **hue_colors(hue, colors), marker="o",
                             markersize=3, markeredgewidth=0, errorbar=errorbar, seed=seed,
                             legend=False, ax=ax)
                diverged |= mark_diverged(ax, part, x, y)
            for i, level in enumerate(references.values()):
                ax.axhline(level, ls=DASHES[i % len(DASHES)], lw=0.8, color="0.35", zorder=0)
            ax.set(xlabel="", ylabel="")
            layer_axis(ax, part[x])
        extra = [Line2D([], [], ls=DASHES[i % len(DASHES)], lw=0.8, color="0.35", label=label)
                 for i, label in enumerate(references)]
        runs = most_runs(profile, [hue, col, x])
        fig = finish(facet, f"{title}; {mean_text(log, errorbar, runs)}",
                     [*run_notes(data), *notes], xlabel=LAYER_LABEL, ylabel=ylabel,
                     legend=colors, legend_title=hue or "",
                     extra=extra + ([diverged_handle()] if diverged else []))
    return fig


def grad_norm_by_layer(data: pd.DataFrame, *, x: str = "layer", y: str = "grad_weight_norm",
                       hue: str = "activation", col: str = "depth", epoch: int | None = 1,
                       errorbar=CI, seed: int = BOOT_SEED,
                       hue_order: Sequence | None = None) -> Figure:
    """Figure 1: gradient norm by layer from input to output (log y), hue = activation, one
    panel per depth.

    Args:
        data: the ``grads`` frame of ``gradlab.load`` (or of ``gradlab.watch``: a facet whose
            column is missing is not drawn).
        y: a norm column (``grad_weight_norm``, ``grad_output_norm``, ...).
        epoch: per run and layer, ``y`` is averaged over the recorded steps of this epoch
            (None, or a frame without epochs: all steps); then the geometric mean over seeds
            is drawn with a bootstrap CI (``errorbar``, seaborn's ``seed``).
    """
    label = NORM_LABELS.get(y, y)
    return layer_figure(data, x=x, y=y, hue=hue, col=col, epoch=epoch, log=True,
                        errorbar=errorbar, seed=seed, hue_order=hue_order,
                        title=f"Gradient norm by layer: per run the mean over "
                              f"{steps_text(data, epoch)}",
                        ylabel=f"gradient norm {label}")


def act_grad_by_layer(data: pd.DataFrame, *, x: str = "layer", y: str = "act_grad_mean",
                      hue: str = "activation", col: str = "depth", epoch: int | None = 1,
                      errorbar=CI, seed: int = BOOT_SEED,
                      hue_order: Sequence | None = None) -> Figure:
    """Figure 4: the measured attenuation, mean f′(z) per hidden layer, against the largest f′
    of each activation drawn (dashed: σ′'s 0.25 for a sigmoid, 1 for tanh or relu). Averaging
    as in ``grad_norm_by_layer`` (arithmetic over seeds); the output layer has no activation
    and is left out."""
    check_columns(data, x)
    return layer_figure(hidden_rows(with_runs(data), x), x=x, y=y, hue=hue, col=col,
                        epoch=epoch, log=False, errorbar=errorbar, seed=seed,
                        hue_order=hue_order, lines=largest_slopes,
                        title=f"Mean f′ per hidden layer: per run the mean over "
                              f"{steps_text(data, epoch)}",
                        ylabel="mean f′(z) over units and batch")


DASHES = ("--", ":", "-.")  # one per reference line of a figure


def largest_slopes(data: pd.DataFrame) -> dict[str, float]:
    """The largest f′ of each activation in ``data``, as ``{label: value}``, activations that
    share a value on one line: {"max σ′ = 0.25": 0.25, "max f′ of relu, tanh = 1": 1.0}."""
    if "activation" not in data:
        return {}
    by_value: dict[float, list[str]] = {}
    for name in sorted(data["activation"].dropna().astype(str).unique()):
        if name in ACTIVATIONS:
            by_value.setdefault(ACTIVATIONS[name].max_derivative, []).append(name)
    return {("max σ′" if names == ["sigmoid"] else f"max f′ of {', '.join(names)}")
            + f" = {value:g}": value for value, names in sorted(by_value.items())}
