"""Every figure at the edges of a first report (one epoch, one seed, one depth, one recorded
step, a folder of mixed configurations) and on a frame without facet columns: no text overlaps
another (boxes as the renderer lays them out), no layout warning, nothing claimed that the
data cannot give (a CI of one seed), nothing left undrawn."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from gradlab import plots
from gradlab.tables import with_setup

from .plot_cases import CASES, case, watch_frame
from .text_boxes import overlaps


@functools.cache  # drawn once a session: the tests only read the figures
def draw_all(name: str) -> dict[str, Figure]:
    """Every figure of a case, as ``gradlab plot`` draws them; any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = plots.prepare(case(name), name)
        return dict(plots.figures(data))


# "mixed" (18 runs at three depths) takes the time of the other cases together: the slow tier
@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow)
                                        if name == "mixed" else name for name in CASES])
def drawn(request) -> tuple[str, dict[str, Figure]]:
    return request.param, draw_all(request.param)


def titles(fig: Figure) -> str:
    texts = [fig.get_suptitle(), *(ax.get_title() for ax in fig.axes)]
    return " ".join(texts).replace("\n", " ")


def test_no_text_overlaps_and_every_figure_is_drawn(drawn):
    name, figs = drawn
    assert list(figs) == list(plots.FIGURES), name
    for figure, fig in figs.items():
        assert overlaps(fig) == [], (name, figure)


def test_wording_matches_the_number_of_seeds(drawn):
    name, figs = drawn
    one_seed = CASES[name].get("seeds") == (0,)
    for figure, fig in figs.items():
        text = titles(fig)
        if one_seed:
            assert "95%" not in text and "over seeds" not in text, (name, figure, text)
            assert "one seed" in text, (name, figure, text)
        elif figure in ("grad_norm_by_layer", "act_grad_by_layer", "accuracy_by_epoch",
                        "vanishing_ratio"):
            assert "95%\u00a0CI" in text, (name, figure, text)


def test_bound_is_drawn_at_a_single_depth():
    ax = draw_all("one_depth")["vanishing_ratio"].axes[0]
    (bound,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    x, y = np.asarray(bound.get_xdata()), np.asarray(bound.get_ydata())
    assert len(x) == 2 and x[1] - x[0] > 0.3, "a level line across the depth"
    np.testing.assert_allclose(y, 0.25 ** 2)  # depth 3
    lo, hi = ax.get_ylim()
    assert lo < y[0] < hi


def test_one_recorded_step_draws_points():
    figs = draw_all("one_step")
    for figure in ("grad_norm_over_steps", "saturation_over_steps"):
        for ax in figs[figure].axes:
            lines = [line for line in ax.lines if len(line.get_xdata())]
            assert lines and all(line.get_marker() == "o" for line in lines), figure
            assert list(ax.get_xticks()) == [0.0]


def test_one_epoch_has_one_tick():
    fig = draw_all("one_epoch")["accuracy_by_epoch"]
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [1.0]


@pytest.mark.parametrize("draw", [
    plots.grad_norm_by_layer, plots.act_grad_by_layer, plots.grad_norm_over_steps,
    plots.saturation_over_steps,
    lambda frame: plots.vanishing_ratio(frame).get_figure(root=True),
], ids=["grad_norm_by_layer", "act_grad_by_layer", "grad_norm_over_steps",
        "saturation_over_steps", "vanishing_ratio"])
def test_a_frame_without_facet_columns_is_drawn_in_one_panel(draw):
    frame = watch_frame()
    fig = draw(frame)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    drawn = [line for line in ax.lines if line.get_linestyle() != "--" and len(line.get_xdata())]
    assert drawn, "something is drawn"
    assert all(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all() for line in drawn)
    assert overlaps(fig) == []


def test_steps_figure_of_a_watch_frame_has_a_line_per_layer():
    frame = watch_frame(layers=4)
    ax = plots.grad_norm_over_steps(frame, bins=None).axes[0]
    lines = [line for line in ax.lines if len(line.get_xdata())]
    assert len(lines) == 4
    for layer, line in enumerate(lines):
        expected = frame[frame["layer"] == layer]["grad_weight_norm"].to_numpy()
        np.testing.assert_allclose(line.get_ydata(), expected)


def test_vanishing_ratio_of_a_frame_without_depth_uses_its_last_layer():
    frame = watch_frame(layers=4)
    ratios = plots.vanishing_ratios(frame)
    wide = frame.pivot(index="step", columns="layer", values="grad_weight_norm")
    assert len(ratios) == 1 and ratios["depth"].iloc[0] == 4
    assert math.isclose(ratios["vanishing_ratio"].iloc[0], (wide[0] / wide[3]).median())


def test_accuracy_of_a_frame_without_split_or_facets():
    frame = pd.DataFrame({"epoch": [1, 2, 3], "accuracy": [0.5, 0.7, 0.8],
                          "loss": [1.0, 0.6, 0.4]})
    fig = plots.accuracy_by_epoch(frame)
    assert len(fig.axes) == 2  # accuracy and loss, no depth panels
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), frame["accuracy"])


def test_setup_labels_with_missing_values_and_default_init():
    runs = pd.DataFrame({
        "run_id": list("abcd"), "activation": "relu", "depth": 6,
        "init": ["kaiming_normal", "normal:0.2", "normal:0.2", "default"],
        "clip_grad_norm": [math.nan, 10.0, math.nan, math.nan]})
    labelled, hue = with_setup(runs, runs)
    assert hue == "setup"
    assert labelled["setup"].tolist() == [
        "relu, init=kaiming_normal", "relu, clip_grad_norm=10.0", "relu", "relu, init=default"]
