"""Figure 5: test accuracy and loss by epoch."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from ..tables import with_runs
from .frames import by_setup, check_columns, facet_column, finite, levels, most_runs, run_notes
from .layout import diverged_handle, facets, finish, integer_ticks, mark_diverged
from .style import BOOT_SEED, CI, hue_colors, mean_text, palette_of, paper_style


def accuracy_by_epoch(data: pd.DataFrame, *, x: str = "epoch",
                      y: Sequence[str] = ("accuracy", "loss"), hue: str = "activation",
                      col: str = "depth", split: str = "test", errorbar=CI,
                      seed: int = BOOT_SEED, hue_order: Sequence | None = None,
                      runs: pd.DataFrame | None = None) -> Figure:
    """Figure 5: ``split`` accuracy and loss by epoch, one row per metric, hue = activation,
    one panel per depth; mean over seeds with a bootstrap CI.

    Args:
        data: the ``epochs`` frame of ``gradlab.load`` (a frame without ``split`` is drawn
            whole; a facet whose column is missing is not drawn).
        runs: its ``runs`` frame, to name in the title also the diverged and failed runs that
            never finished an epoch (they have no rows in ``data``).
    """
    y = [y] if isinstance(y, str) else list(y)
    data = with_runs(data)
    hue, col = facet_column(data, hue), facet_column(data, col)
    data, hue = by_setup(data, hue, col)
    check_columns(data, x, *y)
    with paper_style():
        rows = data[data["split"] == split] if "split" in data else data
        ids = [c for c in dict.fromkeys(["run_id", x, hue, col, "status"]) if c and c in data]
        long = rows.melt(id_vars=ids, value_vars=y, var_name="metric", value_name="value")
        long, notes = finite(long, "value", label=f"{split} {'/'.join(y)}")
        if long.empty:
            raise ValueError(f"no finite {split} {', '.join(y)} values to draw")
        colors = palette_of(long, hue, hue_order)
        facet = facets(long, "metric", col, sharex=True, sharey="row", row_order=y,
                       row_names={}, panel_height=1.0)
        first_col = (levels(long, col) or [None])[0]
        epochs = levels(long, x)
        diverged = False
        for ax, metric, c, part in facet.panels:
            if not part.empty:
                sns.lineplot(part, x=x, y="value", **hue_colors(hue, colors), marker="o",
                             markersize=3, markeredgewidth=0, errorbar=errorbar, seed=seed,
                             legend=False, ax=ax)
                diverged |= mark_diverged(ax, part, x, "value", last_of=[])
            if metric == "accuracy":
                ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            integer_ticks(ax, epochs)
            # short: two rows' labels side by side must not reach each other
            ax.set(xlabel="", ylabel=f"{split} {metric}" if c == first_col else "")
        per_point = most_runs(long, [hue, col, x, "metric"])
        what = " and ".join({"loss": "loss (cross-entropy)"}.get(m, m) for m in y)
        fig = finish(facet, f"{split.capitalize()} {what} by epoch "
                            f"({mean_text(False, errorbar, per_point)})",
                     [*run_notes(data if runs is None else runs), *notes], xlabel="epoch",
                     ylabel="", legend=colors, legend_title=hue or "",
                     extra=[diverged_handle()] if diverged else [])
    return fig
