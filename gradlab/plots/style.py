"""The look of every figure: seaborn's paper style in a context, sizes, colours and labels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import matplotlib
import pandas as pd
import seaborn as sns

from .frames import levels

DPI = 200
WIDTH_SINGLE, WIDTH_DOUBLE = 3.4, 7.0  # inches: one and two columns of a paper
CI = ("ci", 95)
BOOT_SEED = 0  # bootstrap CIs are drawn from a fixed seed, so figures are reproducible
LAYER_LABEL = "layer (input → output)"
DIVERGED_COLOR = "crimson"
ONE_COLOR = sns.color_palette("colorblind")[0]  # lines of a frame without a hue column
NORM_LABELS = {
    "grad_weight_norm": "‖∂L/∂W‖",
    "grad_bias_norm": "‖∂L/∂b‖",
    "grad_output_norm": "‖∂L/∂z‖",
    "weight_norm": "‖W‖",
    "update_ratio": "‖ΔW‖ / ‖W‖",
}


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


def palette(values: Sequence, name: str = "colorblind") -> dict:
    """One colour per value, in order."""
    return dict(zip(values, sns.color_palette(name, len(values)), strict=True))


def palette_of(data: pd.DataFrame, hue: str | None, hue_order: Sequence | None = None) -> dict:
    """The colour of each ``hue`` level (``hue_order``, else the levels in ``data``); none
    without a hue."""
    return palette(hue_order or levels(data, hue)) if hue is not None else {}


def hue_colors(hue: str | None, colors: dict) -> dict:
    """seaborn's colour arguments: a colour per ``hue`` level, or one colour without a hue."""
    if hue is None:
        return {"color": ONE_COLOR}
    return {"hue": hue, "hue_order": list(colors), "palette": colors}


def mean_text(log: bool, errorbar, runs: int | None = None, seeded: bool = True) -> str:
    """How a figure averages over seeds, e.g. "geometric mean over seeds, 95% CI"; with
    ``runs`` = 1 (one run behind each point) "one seed", as there is nothing to average (or
    "one run", where the runs have no seeds: a model of the user's own)."""
    ci = isinstance(errorbar, tuple) and errorbar[0] == "ci"
    if runs == 1:
        one = "one seed" if seeded else "one run"
        return f"{one}, no CI" if ci else one
    ci_text = f", {errorbar[1]}% CI" if ci else ""
    # a no-break space keeps "95% CI" on one line when the title is wrapped
    return ("geometric mean" if log else "mean") + f" over seeds{ci_text}".replace(
        "% CI", "%\u00a0CI")
