"""The gradient through time of a recurrent layer: ‖∂L/∂x_t‖ (or ‖∂L/∂y_t‖) against the time
step t, one line per recorded training step (the ``time`` frame of ``gradlab.load``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from .frames import check_columns, facet_column, finite, levels
from .layout import own_panel, set_title
from .style import ONE_COLOR, palette, paper_style

TIME_LABELS = {"grad_input_norm": "‖∂L/∂x_t‖", "grad_output_norm": "‖∂L/∂y_t‖"}
MAX_LEGEND = 8  # hue levels named in the legend (evenly spaced among them)


def grad_norm_through_time(data: pd.DataFrame, *, x: str = "t", y: str = "grad_input_norm",
                           hue: str = "step", layer: str | None = None,
                           ax: Axes | None = None) -> Axes:
    """The gradient through time of a recurrent layer (log y): ``y`` (``grad_input_norm``,
    ‖∂L/∂x_t‖ over the batch, or ``grad_output_norm``, ‖∂L/∂y_t‖) against the time step t, one
    line per ``hue`` level (recorded step; several runs: one line per run and step).

    Args:
        data: the ``time`` frame of ``gradlab.load`` (or of a ``TimeRecorder``).
        layer: the ``layer_name`` to draw; default: the first in ``layer`` order.
        ax: the Axes to draw on, with the legend on it; None draws a figure of its own, the
            legend under the axes.

    Returns the Axes.
    """
    check_columns(data, x, y, "layer_name")
    if layer is None and not data.empty:
        first = data.sort_values("layer", kind="stable") if "layer" in data else data
        layer = first["layer_name"].iloc[0]
    rows = data[data["layer_name"] == layer] if layer is not None else data
    if ax is None:
        return own_panel(rows, lambda panel: grad_norm_through_time(
            rows, x=x, y=y, hue=hue, layer=layer, ax=panel))
    hue = facet_column(rows, hue)
    label = TIME_LABELS.get(y, y)
    with paper_style():
        shown, notes = finite(rows, y, log=True, label=label)
        if shown.empty:
            why = " (the module's input did not require grad)" if y == "grad_input_norm" else ""
            raise ValueError(f"no finite {y} values of layer {layer!r} to draw{why}")
        colors = palette(levels(shown, hue), "viridis") if hue else {}
        line = shown.assign(_line=shown["run_id"].astype(str) if "run_id" in shown else "")
        ax.set_yscale("log")
        for key, part in line.groupby([hue, "_line"] if hue else ["_line"], sort=True):
            part = part.sort_values(x)
            color = colors[key[0]] if hue else ONE_COLOR
            sns.lineplot(part, x=x, y=y, color=color, estimator=None,
                         lw=0.8, legend=False, ax=ax,
                         **({"marker": "o", "markersize": 3} if len(part) == 1 else {}))
        named = list(colors)
        if len(named) > MAX_LEGEND:
            named = [named[i] for i in np.linspace(0, len(named) - 1, MAX_LEGEND).round()
                     .astype(int)]
        ax.legend(handles=[Line2D([], [], color=colors[k], label=str(k)) for k in named],
                  title=hue or "", frameon=False, fontsize=6.5, loc="best")
        ax.set_xlabel("time step t")
        ax.set_ylabel(f"{label} over the batch")
        set_title(ax, f"Gradient through time of {layer}, {label}, one line per {hue or 'run'}",
                  notes, width=ax.get_figure(root=True).get_figwidth())
    return ax
