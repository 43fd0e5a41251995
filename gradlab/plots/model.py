"""The figures of any model (a run of ``gradlab.watch`` or a framework callback): layers by
their names in forward order, never a depth or an activation that the model does not have.

    layer_profile(grads)          ‖∂L/∂W‖ and the update ratio ‖ΔW‖/‖W‖ of each layer
    act_grad_by_name(grads)       mean f′ of the layers whose activation is known, each against
                                  its own activation's largest f′
    metrics_over_steps(metrics)   what ``rec.log`` recorded (loss, accuracy, ...) per split
    through_time_figure(time)     each recurrent layer's gradient through time
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..activations import ACTIVATIONS
from ..tables import with_runs
from .frames import bin_steps, check_columns, facet_column, finite, levels
from .layout import facets, finish, integer_ticks
from .style import (
    LAYER_LABEL,
    NORM_LABELS,
    ONE_COLOR,
    WIDTH_DOUBLE,
    WIDTH_SINGLE,
    palette,
    paper_style,
)
from .through_time import TIME_LABELS, grad_norm_through_time

LONGEST_NAME = 22  # characters of a layer name on an axis; longer ones keep their end
QUANTITIES = {"grad_weight_norm": "gradient norm ‖∂L/∂W‖",
              "update_ratio": "update ratio ‖ΔW‖ / ‖W‖"}
SPREAD = "median over recorded steps; bar: 25th to 75th percentile"


def layer_order(data: pd.DataFrame) -> list[str]:
    """The layer names of ``data`` in forward order (``layer``; several models: the first
    position a name is seen at)."""
    check_columns(data, "layer", "layer_name")
    pairs = data[["layer", "layer_name"]].drop_duplicates().sort_values(
        ["layer", "layer_name"], kind="stable")
    return list(dict.fromkeys(pairs["layer_name"].astype(str)))


def ordered_names(data: pd.DataFrame) -> pd.DataFrame:
    """``data`` with ``layer_name`` as an ordered categorical in forward order, so that every
    legend and axis lists the layers from input to output."""
    kind = pd.CategoricalDtype(layer_order(data), ordered=True)
    return data.assign(layer_name=data["layer_name"].astype(str).astype(kind))


def short_name(name: str) -> str:
    """A layer name short enough for an axis: its end, which names the layer within its block
    (``transformer.h.3.mlp.c_fc`` → ``…h.3.mlp.c_fc``)."""
    return name if len(name) <= LONGEST_NAME else "…" + name[-(LONGEST_NAME - 1):]


def name_axis(ax, names: Sequence[str]) -> None:
    """Layer names as the x ticks of positions 0, 1, ...; slanted where there are many."""
    labels = [short_name(n) for n in names]
    slant = len(names) > 4 or max(map(len, labels), default=0) > 8
    ax.set_xticks(range(len(names)), labels, rotation=40 if slant else 0,
                  ha="right" if slant else "center", rotation_mode="anchor")
    ax.set_xlim(-0.5, len(names) - 0.5)


def spread(data: pd.DataFrame, by: Sequence[str], y: str) -> pd.DataFrame:
    """Median and quartiles of ``y`` per ``by`` group (over its recorded steps)."""
    groups = data.groupby(list(by), sort=True, observed=True)[y]
    return pd.DataFrame({"median": groups.median(), "lo": groups.quantile(0.25),
                         "hi": groups.quantile(0.75)}).reset_index()


def draw_spread(ax, stats: pd.DataFrame, position: dict, color, label: str | None = None):
    x = stats["layer_name"].astype(str).map(position).to_numpy(float)
    med = stats["median"].to_numpy(float)
    err = np.vstack([med - stats["lo"].to_numpy(float), stats["hi"].to_numpy(float) - med])
    ax.errorbar(x, med, yerr=np.clip(err, 0, None), color=color, marker="o", markersize=3,
                lw=1.0, elinewidth=0.8, capsize=1.5, label=label)


def hue_levels(data: pd.DataFrame, hue: str | None) -> tuple[str | None, dict]:
    """The hue column (none where every row is one run) and its colours."""
    hue = facet_column(data, hue)
    if hue is None or data[hue].nunique() < 2:
        return None, {}
    return hue, palette(levels(data, hue))


def layer_profile(data: pd.DataFrame, *, y: Sequence[str] = tuple(QUANTITIES),
                  hue: str | None = "run_id") -> Figure:
    """Each layer's gradient norm ‖∂L/∂W‖ and update ratio ‖ΔW‖/‖W‖ (log y), layers by name
    from input to output: per run the median over its recorded steps, with the quartiles as a
    bar. A quantity with no finite value (no optimizer step was seen) is left out.

    Args:
        data: the ``grads`` frame of ``gradlab.load`` or of ``gradlab.watch``.
        hue: one line per value of this column (default: per run; one run: one colour).
    """
    data = with_runs(data)
    names = layer_order(data)
    position = {n: i for i, n in enumerate(names)}
    shown, notes = [], []
    for column in y:
        check_columns(data, column)
        rows, dropped = finite(data, column, log=True, label=NORM_LABELS.get(column, column))
        if not rows.empty:
            shown.append(rows.assign(quantity=QUANTITIES.get(column, column),
                                     value=rows[column]))
            notes += dropped
    if not shown:
        raise ValueError(f"no finite {' or '.join(y)} values to draw")
    long = pd.concat(shown, ignore_index=True)
    hue, colors = hue_levels(long, hue)
    with paper_style():
        facet = facets(long, None, "quantity", sharex=True, sharey=False, panel_height=1.9,
                       width=WIDTH_DOUBLE)
        for ax, _, _, part in facet.panels:
            ax.set_yscale("log")
            for level, color in (colors or {None: ONE_COLOR}).items():
                rows = part if level is None else part[part[hue] == level]
                if not rows.empty:
                    draw_spread(ax, spread(rows, ["layer_name"], "value"), position, color)
            name_axis(ax, names)
            ax.set(xlabel="", ylabel="")
        steps = long.groupby("run_id")["step"].nunique()
        title = (f"Per layer, input to output: {SPREAD} "
                 f"({steps.min()}{'' if steps.min() == steps.max() else f'–{steps.max()}'} "
                 f"recorded steps per run)")
        fig = finish(facet, title, notes, xlabel=LAYER_LABEL, legend=colors,
                     legend_title=hue or "")
    return fig


def act_grad_by_name(data: pd.DataFrame, *, y: str = "act_grad_mean",
                     activation: str = "layer_activation",
                     hue: str | None = "run_id") -> Figure:
    """Mean f′(z) of each layer whose activation is known (median over recorded steps,
    quartiles as a bar), each against its own activation's largest f′ (dashed): 0.25 for a
    sigmoid, 1 for tanh or relu. Layers whose f′ is not known are left out and named.

    Args:
        data: the ``grads`` frame, with ``activation`` naming each row's activation (the
            report joins it in from the run's description of its layers).
    """
    data = with_runs(data)
    check_columns(data, y, activation)
    known = data[data[activation].notna() & np.isfinite(data[y].to_numpy(float))]
    if known.empty:
        raise ValueError(f"no layer with a known activation has {y} values")
    names = layer_order(known)
    labels = {n: f"{n} ({act})" for n, act in known.drop_duplicates("layer_name")[
        ["layer_name", activation]].itertuples(index=False)}
    position = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(data["layer_name"].astype(str)) - set(names))
    notes = [f"f′ not known (no activation after the layer, or none given): "
             f"{', '.join(unknown)}"] if unknown else []
    hue, colors = hue_levels(known, hue)
    with paper_style():
        facet = facets(known, None, None, panel_height=1.9,
                       width=min(WIDTH_DOUBLE, max(WIDTH_SINGLE, 2.2 + 0.45 * len(names))))
        ax = facet.panels[0][0]
        for level, color in (colors or {None: ONE_COLOR}).items():
            rows = known if level is None else known[known[hue] == level]
            if not rows.empty:
                draw_spread(ax, spread(rows, ["layer_name"], y), position, color)
        for name, act in known.drop_duplicates("layer_name")[
                ["layer_name", activation]].itertuples(index=False):
            top = ACTIVATIONS[act].max_derivative if act in ACTIVATIONS else None
            if top is not None:
                i = position[str(name)]
                ax.plot([i - 0.35, i + 0.35], [top, top], ls="--", lw=0.8, color="0.35")
        name_axis(ax, [labels[n] for n in names])
        ax.set(xlabel="", ylabel="")
        line = Line2D([], [], ls="--", lw=0.8, color="0.35",
                      label="largest f′ of the layer's activation")
        fig = finish(facet, f"Mean f′ per layer: {SPREAD}", notes, xlabel=LAYER_LABEL,
                     ylabel="mean f′(z) over units and batch", legend=colors,
                     legend_title=hue or "", extra=[line])
    return fig


def metrics_over_steps(data: pd.DataFrame, *, hue: str = "split", col: str = "metric",
                       row: str | None = "run_id", bins: int | None = 100) -> Figure:
    """What ``rec.log`` recorded, per metric (a panel each) and split (a line each) over
    optimizer steps; ``bins`` caps the points per line (the mean within each bin).

    Args:
        data: the ``metrics`` frame of ``gradlab.load`` (``run_id, step, split, metric,
            value``).
        row: one row of panels per value (default: per run, where there are several).
    """
    data = with_runs(data)
    check_columns(data, "step", "value", hue, col)
    rows, notes = finite(data, "value")
    if rows.empty:
        raise ValueError("no finite logged values to draw")
    row = facet_column(rows, row)
    if row is not None and rows[row].nunique() < 2:
        row = None
    with paper_style():
        colors = palette(levels(rows, hue))
        facet = facets(rows, row, col, sharex=True, sharey=False, panel_height=1.2,
                       row_names=None if row else {})
        for ax, _, _, part in facet.panels:
            for level, color in colors.items():
                line = part[part[hue] == level]
                if line.empty:
                    continue
                line, width = bin_steps(line, "step", bins)
                means = line.groupby("step", sort=True)["value"].mean().reset_index()
                points = {"marker": "o", "markersize": 3} if len(means) <= 20 else {}
                sns.lineplot(means, x="step", y="value", color=color, estimator=None, lw=0.9,
                             legend=False, ax=ax, **points)
            integer_ticks(ax, levels(part, "step"), most=4)
            ax.set(xlabel="", ylabel="")
        fig = finish(facet, "Logged metrics over training (rec.log; a long series as the mean "
                            "per bin of steps)", notes, xlabel="optimizer step",
                     legend=colors, legend_title=hue)
    return fig


def through_time_figure(data: pd.DataFrame) -> Figure:
    """Each recurrent layer's gradient through time (``grad_norm_through_time``), a panel per
    layer: ‖∂L/∂x_t‖ where the layer's input required grad, else ‖∂L/∂y_t‖."""
    check_columns(data, "layer_name", "t")
    names = layer_order(data)
    with paper_style():
        frame = data.assign(panel=pd.Categorical(data["layer_name"].astype(str), names,
                                                 ordered=True))
        facet = facets(frame, None, "panel", sharex=False, sharey=False, panel_height=1.9,
                       width=min(WIDTH_DOUBLE, max(WIDTH_SINGLE, 3.0 * len(names))))
        handles, title = [], ""
        for ax, _, name, part in facet.panels:
            y = ("grad_input_norm" if (part["grad_input_norm"].to_numpy(float) > 0).any()
                 else "grad_output_norm")
            grad_norm_through_time(part, y=y, layer=name, ax=ax)
            legend = ax.get_legend()  # (one legend under the panels: the steps are shared)
            handles, title = handles or legend.legend_handles, legend.get_title().get_text()
            legend.remove()
            ax.set_title(f"{name}: {TIME_LABELS.get(y, y)} against t", fontsize=7)
        fig = finish(facet, "Gradient through time: the norm over the batch at each time step "
                            "t, one line per recorded step", legend=None,
                     extra=handles, legend_title=title)
    return fig
