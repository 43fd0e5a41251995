"""Where a drawn figure's text lands: the boxes of tick labels, axis labels, titles, legend
entries and annotations, as the Agg renderer lays them out, and which of them overlap."""

from __future__ import annotations

import itertools

from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from gradlab.plots.files import freeze_layout


def texts(fig: Figure) -> list[tuple[str, Text]]:
    """Every visible, non-empty text of ``fig``, each with a name saying where it is."""
    found: list[tuple[str, Text]] = []
    for i, ax in enumerate(fig.axes):
        for axis_name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(lo), abs(hi), 1)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if lo - slack <= tick.get_loc() <= hi + slack:  # others are not drawn
                    found += [(f"ax{i} {axis_name}tick", tick.label1),
                              (f"ax{i} {axis_name}tick", tick.label2)]
            found.append((f"ax{i} {axis_name}label", axis.label))
            found.append((f"ax{i} {axis_name}offset", axis.get_offset_text()))
        found.append((f"ax{i} title", ax.title))
        found += [(f"ax{i} text", t) for t in ax.texts]
        if ax.get_legend() is not None:
            found += [(f"ax{i} legend", t) for t in ax.get_legend().get_texts()]
            found.append((f"ax{i} legend title", ax.get_legend().get_title()))
    for j, sub in enumerate([fig, *fig.subfigs]):
        found += [(f"fig{j} text", t) for t in sub.texts]
        for legend in sub.legends:
            found += [(f"fig{j} legend", t) for t in legend.get_texts()]
            found.append((f"fig{j} legend title", legend.get_title()))
    return [(name, t) for name, t in found if t.get_visible() and t.get_text().strip()]


def boxes(fig: Figure) -> list[tuple[str, str, Bbox]]:
    """(where, text, box in pixels) of every visible text after the figure is laid out."""
    freeze_layout(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    out = []
    for name, text in texts(fig):
        box = text.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            out.append((name, text.get_text(), box))
    return out


def overlaps(fig: Figure, gap: float = 1.0) -> list[str]:
    """Pairs of texts less than ``gap`` pixels apart (touching labels such as "0.960.98" read as
    one), and texts that reach outside the figure, as lines naming them."""
    found = boxes(fig)
    problems = []
    for (n1, t1, b1), (n2, t2, b2) in itertools.combinations(found, 2):
        inter = Bbox.intersection(b1.padded(gap / 2), b2.padded(gap / 2))
        if inter is not None and inter.width > 0 and inter.height > 0:
            problems.append(f"{n1} {t1!r} overlaps {n2} {t2!r}")
    width, height = fig.bbox.width, fig.bbox.height
    for name, text, box in found:
        if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
            problems.append(f"{name} {text!r} reaches outside the figure")
    return problems
