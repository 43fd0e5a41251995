"""Facets and legends: a figure of panels with one legend row under them, sized to what it
holds as measured, titles that carry notes, and the axes' ticks."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter

from .frames import levels
from .style import DIVERGED_COLOR, WIDTH_DOUBLE, WIDTH_SINGLE, paper_style

LEGEND_GUESS = 0.5  # inches for the legend row until it is measured


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
           panel_height: float = 1.1, width: float | None = None) -> Facets:
    """A Figure with one panel per (row, col) level of ``data``; see ``Facets``. Columns are
    named above the top row, rows at the right margin (``row_names`` overrides the text; an
    empty dict names none). ``width`` in inches; default: from the number of columns."""
    rows = list(row_order) if row_order is not None else (levels(data, row) or [None])
    cols = levels(data, col) or [None]
    width = width or min(WIDTH_DOUBLE, max(WIDTH_SINGLE, 0.7 + 1.05 * len(cols)))
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
    if column in ("activation", "setup", "metric", "quantity", "panel", "run_id"):
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
        room = fig.get_figwidth() - 0.1
        if extent.width / fig.dpi > room and ncols == 1:  # a label longer than the figure
            wrap_labels(box, room / (extent.width / fig.dpi))
            extent = box.get_window_extent(renderer)
        if extent.width / fig.dpi <= room or ncols == 1:
            need = extent.height / fig.dpi + 0.06
            break
        box.remove()
    title_height = 0.0
    if title_text is not None:
        title_height = title_text.get_window_extent(renderer).height / fig.dpi + 0.1
    facet.grid.set_height_ratios([facet.main, need])
    fig.set_figheight(facet.main + need + title_height)
    return fig


def wrap_labels(legend, shrink: float) -> None:
    """Wrap a legend's labels to ``shrink`` times the length of the longest one (< 1)."""
    longest = max(len(t.get_text()) for t in legend.get_texts())
    chars = max(12, int(longest * shrink) - 2)
    for text in legend.get_texts():
        text.set_text(wrap(text.get_text(), chars))


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


class FewTicks(MaxNLocator):
    """Integer ticks, at most ``most``, fewer where a narrow panel has no room for their
    labels (matplotlib's own estimate of the room, ``Axis.get_tick_space``)."""

    def __init__(self, most: int = 6):
        super().__init__(integer=True, nbins=most)
        self.most = most

    def __call__(self):
        if self.axis is not None:
            self.set_params(nbins=max(1, min(self.most, self.axis.get_tick_space())))
        return super().__call__()


def integer_ticks(ax: Axes, values: Sequence = (), most: int = 6) -> None:
    """Integer x ticks; a single value (one epoch, one recorded step) gets one tick and room
    around it, where matplotlib would label fractions of it."""
    if len(values) == 1:
        ax.set_xticks(list(values))
        ax.set_xlim(values[0] - 0.5, values[0] + 0.5)
    else:
        ax.xaxis.set_major_locator(FewTicks(most))


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
    """Readable ticks on every log y axis: only the decades labelled where two or more are in
    view (matplotlib labels the minor ticks of short ranges too, and they crowd a small panel);
    1, 2 and 5 times each decade where fewer are; three evenly spaced values where even those
    leave fewer than two labels (a range of less than a factor of 2.5)."""
    for ax in fig.axes:
        if ax.get_yscale() != "log":
            continue
        lo, hi = ax.get_ylim()
        if not 0 < lo < hi < math.inf:
            continue
        decades = math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1
        ax.yaxis.set_minor_formatter(NullFormatter())
        if decades >= 2:
            continue
        fine = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
        shown = [v for v in fine.tick_values(lo, hi) if lo <= v <= hi]
        ax.yaxis.set_major_locator(fine if len(shown) >= 2 else MaxNLocator(nbins=3))
        # (a label at every tick: matplotlib's default labels only some below two decades)
        ax.yaxis.set_major_formatter(LogFormatterSciNotation(
            labelOnlyBase=False, minor_thresholds=(math.inf, math.inf)))


def own_panel(data: pd.DataFrame, draw) -> Axes:
    """An axes-level figure drawn on a figure of its own: ``draw(ax)`` on one panel sized for
    ``data``, its legend moved beside the panel; returns the Axes."""
    with paper_style():
        facet = facets(data, None, None, panel_height=1.9)
        ax = draw(facet.panels[0][0])
        legend = ax.get_legend()
        handles, title = legend.legend_handles, legend.get_title().get_text()
        legend.remove()
        fit(facet, handles, title)
    return ax
