"""Figure 3: the vanishing ratio ‖g_first‖/‖g_last‖ against depth, beside 0.25^(depth−1), the
product of σ′'s largest value over the sigmoid layers (the tutorial's number)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..tables import SIGMOID_MAX_SLOPE, vanishing_ratios
from .frames import by_setup, check_columns, facet_column, finite, levels, most_runs, run_notes
from .layout import own_panel, set_title
from .style import BOOT_SEED, CI, DIVERGED_COLOR, hue_colors, mean_text, palette_of, paper_style


def vanishing_ratio(data: pd.DataFrame, *, x: str = "depth", y: str = "vanishing_ratio",
                    hue: str = "activation", ax: Axes | None = None, errorbar=CI,
                    seed: int = BOOT_SEED, hue_order: Sequence | None = None) -> Axes:
    """Figure 3: the vanishing ratio ‖g_first‖/‖g_last‖ against depth per ``hue`` (log y): the
    geometric mean over seeds with a bootstrap CI, each run as a dot (diverged runs as ×), and
    0.25^(depth−1) dashed: the product of σ′'s largest value over the depth−1 sigmoid layers,
    the most that σ′ alone passes back; the ratio also carries the weights' norms and each
    layer's inputs, so it may lie above the line.

    Args:
        data: the ``grads`` frame of ``gradlab.load`` (or of ``gradlab.watch``), or
            ``gradlab.tables.vanishing_ratios(grads)``.
        ax: the Axes to draw on, with the legend on it; None draws a figure of its own, the
            legend under the axes (``ax.figure`` is the figure of ``gradlab plot``).

    Returns the Axes.
    """
    ratios = data if y in data.columns else vanishing_ratios(data)
    ratios, hue = by_setup(ratios, hue)
    if ax is None:
        return own_panel(ratios, lambda panel: vanishing_ratio(
            ratios, x=x, y=y, hue=hue, ax=panel, errorbar=errorbar, seed=seed,
            hue_order=hue_order))
    hue = facet_column(ratios, hue)
    check_columns(ratios, x, y)
    with paper_style():
        shown, notes = finite(ratios, y, log=True)
        colors = palette_of(shown, hue, hue_order)
        ax.set_yscale("log")
        sns.lineplot(shown, x=x, y=y, **hue_colors(hue, colors), marker="o", markersize=4,
                     markeredgewidth=0, errorbar=errorbar, seed=seed, ax=ax, legend=False)
        for level, color in (colors or {None: hue_colors(None, {})["color"]}).items():
            runs = shown if level is None else shown[shown[hue] == level]
            ax.scatter(runs[x], runs[y], s=6, color=color, alpha=0.45, linewidths=0, zorder=3)
        handles = [Line2D([], [], color=c, marker="o", markersize=3, label=str(k))
                   for k, c in colors.items()]
        if "status" in shown.columns and (shown["status"] == "diverged").any():
            diverged = shown[shown["status"] == "diverged"]
            ax.scatter(diverged[x], diverged[y], marker="x", s=18, color=DIVERGED_COLOR,
                       zorder=4)
            handles.append(Line2D([], [], ls="", marker="x", color=DIVERGED_COLOR,
                                  label="diverged run"))
        ax.plot(*slope_product_line(shown[x]), ls="--", lw=0.9, color="0.3")
        handles.append(Line2D([], [], ls="--", color="0.3", label=SLOPE_PRODUCT_LABEL))
        ax.legend(handles=handles, title=hue or "", frameon=False, fontsize=6.5, loc="best")
        ax.set_xticks(levels(shown, x))
        # the paper style's sizes, fixed on the Axes: a user's own figure draws it outside the
        # style, and its default sizes push a one-line y label off a 5×4 figure
        rc = matplotlib.rcParams
        ax.tick_params(axis="both", labelsize=rc["ytick.labelsize"])
        ax.set_xlabel("depth (Linear layers)", fontsize=rc["axes.labelsize"])
        ax.set_ylabel("‖∂L/∂W₀‖ / ‖∂L/∂W_last‖", fontsize=rc["axes.labelsize"])
        runs = most_runs(shown, [hue, x])
        set_title(ax, f"Vanishing ratio, per run the median over steps "
                      f"({mean_text(True, errorbar, runs)})",
                  [*run_notes(ratios), *notes], width=ax.get_figure(root=True).get_figwidth())
    return ax


# says what the line is: σ′'s largest value multiplied over the layers, not a limit on the ratio
SLOPE_PRODUCT_LABEL = "0.25^(depth−1): max σ′\nmultiplied over the layers"


def slope_product_line(depths: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the dashed 0.25^(depth−1) line over the depths drawn: each integer depth
    between the first and the last, or a short level line across a single depth."""
    if depths.empty:
        return np.array([]), np.array([])
    lo, hi = int(depths.min()), int(depths.max())
    x = np.arange(lo, hi + 1, dtype=float) if hi > lo else np.array([lo - 0.3, lo + 0.3])
    return x, SIGMOID_MAX_SLOPE ** (np.round(x) - 1.0)


vanishing_ratio_plot = vanishing_ratio  # its former name, kept for existing code


def vanishing_figure(ratios: pd.DataFrame, hue: str = "activation",
                     hue_order: Sequence | None = None) -> Figure:
    """Figure 3 as a single-column figure, its legend under the axes rather than on the data."""
    return vanishing_ratio(ratios, hue=hue, hue_order=hue_order).get_figure(root=True)
