"""Figures 2 and 6: a quantity per layer over training steps, panels activation × depth."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..tables import per_run, with_runs
from .frames import (
    bin_steps,
    by_setup,
    check_columns,
    facet_column,
    finite,
    inactive_fraction,
    levels,
    most_runs,
    over_seeds,
    run_notes,
)
from .layout import diverged_handle, facets, finish, integer_ticks, mark_diverged
from .style import LAYER_LABEL, NORM_LABELS, hue_colors, mean_text, palette, paper_style


def steps_figure(data, *, x, y, hue, row, col, bins, log, title, ylabel,
                 row_names: dict | None = None, notes: Sequence[str] = (),
                 ylim: tuple[float, float] | None = None) -> Figure:
    """Figures 2 and 6: ``y`` over training steps, one line per ``hue`` (layer), panels
    ``row`` × ``col``; each line is the mean over seeds (geometric on a log axis) of each run's
    mean within a step bin. "{mean}" in ``title`` says so (or that there is one seed)."""
    data = with_runs(data)
    hue, row, col = (facet_column(data, c) for c in (hue, row, col))
    data, row = by_setup(data, row, col)  # (the rows by activation: by setup where it matters)
    check_columns(data, x, y)
    with paper_style():
        rows, dropped = finite(data, y, log=log)
        rows, width = bin_steps(rows, x, bins)
        binned = per_run(rows, [c for c in (x, hue) if c], y, row, col)
        if binned.empty:
            raise ValueError(f"no finite {y} values to draw")
        colors = palette(levels(binned, hue), "viridis") if hue else {}
        # Rows share a y range, not the whole figure: one exploding run must not flatten the rest.
        facet = facets(binned, row, col, sharex=True, sharey="row", row_names=row_names,
                       panel_height=1.0)
        steps = levels(binned, x)
        # one recorded step draws a point per line, not a line of no length
        points = {"marker": "o", "markersize": 3, "markeredgewidth": 0} if len(steps) == 1 \
            else {}
        diverged = False
        for ax, _, _, part in facet.panels:
            if log:
                ax.set_yscale("log")
            if not part.empty:
                # Averaged over seeds here, not by seaborn: its per-point groupby is slow for
                # thousands of steps, and there is no CI to bootstrap.
                means = over_seeds(part, [c for c in (hue, x) if c], y, log)
                sns.lineplot(means, x=x, y=y, **hue_colors(hue, colors), estimator=None,
                             legend=False, lw=0.8, ax=ax, **points)
                diverged |= mark_diverged(ax, part, x, y, last_of=[hue] if hue else [])
            ax.set(xlabel="", ylabel="")
            if ylim is not None:
                ax.set_ylim(*ylim)
            integer_ticks(ax, steps, most=3)
        per = f"mean per {width}-step bin" if width > 1 else "every recorded step"
        mean = mean_text(log, None, most_runs(binned, [row, col, hue, x]),
                         seeded="seed" in data.columns)
        fig = finish(facet, title.replace("{mean}", mean), [*run_notes(data), *notes, *dropped],
                     xlabel=f"training step ({per})", ylabel=ylabel, legend=colors,
                     legend_title=LAYER_LABEL if hue in ("layer", "layer_name") else hue or "",
                     marker=None,
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
                        title=f"Gradient norm {label} per layer over training ({{mean}})",
                        ylabel=f"gradient norm {label}")


def update_ratio_over_steps(data: pd.DataFrame, *, x: str = "step", y: str = "update_ratio",
                            hue: str = "layer", row: str = "activation", col: str = "depth",
                            bins: int | None = 100) -> Figure:
    """The update ratio ‖ΔW‖/‖W‖ (the step the optimizer took, against the weights) of each
    layer over training (log y), one line per layer, panels ``row`` × ``col``."""
    label = NORM_LABELS.get(y, y)
    return steps_figure(data, x=x, y=y, hue=hue, row=row, col=col, bins=bins, log=True,
                        title=f"Update ratio {label} per layer over training ({{mean}})",
                        ylabel=f"update ratio {label}")


def saturation_over_steps(data: pd.DataFrame, *, x: str = "step", hue: str = "layer",
                          row: str = "activation", col: str = "depth",
                          bins: int | None = 100) -> Figure:
    """Figure 6: fraction of saturated units (sigmoid, tanh, softsign: f′ < 0.05·max f′) or dead
    units (relu family: zero output for the whole batch) per hidden layer over training, panels
    activation × depth; mean over seeds per step bin."""
    check_columns(data, "saturated_frac", "dead_frac", "layer")
    frame, notes = inactive_fraction(with_runs(data))
    row = facet_column(frame, row)
    kinds = frame.drop_duplicates(row).set_index(row)["inactive_kind"].to_dict() if row else {}
    return steps_figure(frame, x=x, y="inactive_frac", hue=hue, row=row, col=col, bins=bins,
                        log=False, title="Saturated units (f′ < 0.05·max f′) or dead units "
                                         "(0 for the whole batch) per layer, {mean}",
                        ylabel="fraction of units",
                        row_names={r: f"{r}: {k} units" for r, k in kinds.items()},
                        notes=notes, ylim=(-0.03, 1.03))
