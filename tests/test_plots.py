"""Figures: each draws what a pandas groupby of its input says, diverged runs are shown as such,
and ``gradlab plot`` writes the same bytes twice."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection

from gradlab import plots
from gradlab.config import ConfigError

from .helpers import invoke

ACTIVATIONS, DEPTHS, SEEDS, STEPS = ("relu", "sigmoid"), (2, 3), (0, 1, 2), 6


def synthetic(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy ``grads`` and ``epochs`` frames shaped like ``gradlab.load``'s: 2 activations ×
    2 depths × 3 seeds, 6 steps (3 per epoch), values drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    grads, epochs = [], []
    for activation in ACTIVATIONS:
        for depth in DEPTHS:
            for s in SEEDS:
                run = dict(run_id=f"{activation}-{depth}-{s}", activation=activation,
                           depth=depth, seed=s, status="complete", diverged_step=None)
                for step in range(STEPS):
                    for layer in range(depth):
                        hidden = layer < depth - 1
                        grads.append(dict(
                            run, step=step, epoch=1 + step // 3, layer=layer,
                            grad_weight_norm=10 ** rng.uniform(-5, 0),
                            act_grad_mean=rng.uniform(0.1, 0.9) if hidden else math.nan,
                            saturated_frac=rng.uniform() if hidden and activation == "sigmoid"
                            else math.nan,
                            dead_frac=rng.uniform() if hidden and activation == "relu"
                            else math.nan))
                for epoch in (1, 2, 3):
                    for split in ("train", "test"):
                        epochs.append(dict(run, epoch=epoch, split=split,
                                           accuracy=rng.uniform(0.1, 1), loss=rng.uniform(0, 2)))
    return pd.DataFrame(grads), pd.DataFrame(epochs)


def with_diverged(grads: pd.DataFrame, run_id: str = "relu-3-0", step: int = 4) -> pd.DataFrame:
    """Make one run diverge at ``step``: its records end there, with inf/NaN at that step."""
    grads = grads[(grads["run_id"] != run_id) | (grads["step"] <= step)].copy()
    mine = grads["run_id"] == run_id
    grads.loc[mine, ["status", "diverged_step"]] = ["diverged", step]
    at = mine & (grads["step"] == step)
    grads.loc[at, "grad_weight_norm"] = [np.inf, np.nan, np.inf][: int(at.sum())]
    grads.loc[at, ["act_grad_mean", "dead_frac"]] = np.nan
    return grads


def gmean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def grid(fig, ncols: int) -> list[list]:
    axes = fig.axes
    return [axes[i:i + ncols] for i in range(0, len(axes), ncols)]


def data_lines(ax) -> list:
    """The lines seaborn drew (one per hue level), not reference lines."""
    return [line for line in ax.lines if line.get_linestyle() != "--"]


@pytest.fixture(scope="module")
def frames():
    return synthetic()


def test_grad_norm_by_layer_draws_geometric_mean_over_seeds_of_first_epoch(frames):
    grads, _ = frames
    fig = plots.grad_norm_by_layer(grads)
    per_run = grads[grads["epoch"] == 1].groupby(
        ["activation", "depth", "run_id", "layer"])["grad_weight_norm"].mean()
    expected = per_run.groupby(["activation", "depth", "layer"]).apply(gmean)
    assert [ax.get_title() for ax in fig.axes] == ["depth 2", "depth 3"]
    for ax, depth in zip(fig.axes, DEPTHS):
        assert ax.get_yscale() == "log"
        lines = data_lines(ax)
        assert len(lines) == len(ACTIVATIONS)
        for line, activation in zip(lines, ACTIVATIONS):
            np.testing.assert_array_equal(line.get_xdata(), np.arange(depth))
            np.testing.assert_allclose(line.get_ydata(), expected[activation, depth].to_numpy(),
                                       rtol=1e-10)
        assert ax.collections, "a CI band per activation"
    texts = [t.get_text() for t in fig.texts] + [fig.get_suptitle()]
    assert any("epoch 1" in t for t in texts)
    assert any(t.get_text() == plots.LAYER_LABEL for sub in fig.subfigs for t in sub.texts)


def test_bootstrap_ci_is_seeded(frames):
    grads, _ = frames
    one = plots.grad_norm_by_layer(grads).axes[0].collections[0].get_paths()[0].vertices
    two = plots.grad_norm_by_layer(grads).axes[0].collections[0].get_paths()[0].vertices
    np.testing.assert_array_equal(one, two)


def test_grad_norm_over_steps_one_line_per_layer(frames):
    grads, _ = frames
    fig = plots.grad_norm_over_steps(grads, bins=None)
    expected = grads.groupby(["activation", "depth", "layer", "step"])["grad_weight_norm"] \
        .apply(gmean)
    rows = grid(fig, len(DEPTHS))
    assert len(rows) == len(ACTIVATIONS)
    for row, activation in zip(rows, ACTIVATIONS):
        assert row[-1].texts[0].get_text() == activation  # the row's name at the right
        for ax, depth in zip(row, DEPTHS):
            lines = data_lines(ax)
            assert len(lines) == depth
            for layer, line in enumerate(lines):
                np.testing.assert_array_equal(line.get_xdata(), np.arange(STEPS))
                np.testing.assert_allclose(line.get_ydata(),
                                           expected[activation, depth, layer].to_numpy())


def test_steps_are_binned_for_long_runs(frames):
    grads, _ = frames
    fig = plots.grad_norm_over_steps(grads, bins=2)  # 6 steps → bins of 3, centred at 1 and 4
    line = data_lines(fig.axes[0])[0]
    np.testing.assert_array_equal(line.get_xdata(), [1.0, 4.0])
    sub = grads[(grads["activation"] == "relu") & (grads["depth"] == 2) & (grads["layer"] == 0)]
    per_run = sub.groupby(["run_id", sub["step"] // 3])["grad_weight_norm"].mean()
    expected = per_run.groupby(level=1).apply(gmean)
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())


def test_vanishing_ratios_match_a_groupby(frames):
    grads, _ = frames
    ratios = plots.vanishing_ratios(grads)
    wide = grads.pivot_table(index=["run_id", "step"], columns="layer",
                             values="grad_weight_norm")
    depth = grads.groupby("run_id")["depth"].first()
    last = wide.apply(lambda r: r[depth[r.name[0]] - 1], axis=1)
    expected = (wide[0] / last).groupby(level="run_id").median()
    got = ratios.set_index("run_id")["vanishing_ratio"]
    np.testing.assert_allclose(got.loc[expected.index], expected)
    assert (ratios["steps"] == STEPS).all() and (ratios["dropped"] == 0).all()
    np.testing.assert_allclose(ratios["max_slope_product"], 0.25 ** (ratios["depth"] - 1))


def test_vanishing_ratio_plot_draws_geometric_mean_and_bound(frames):
    grads, _ = frames
    ratios = plots.vanishing_ratios(grads)
    ax = plots.vanishing_ratio_plot(ratios, ax=matplotlib.figure.Figure().add_subplot())
    assert ax.get_yscale() == "log"
    expected = ratios.groupby(["activation", "depth"])["vanishing_ratio"].apply(gmean)
    lines = data_lines(ax)
    for line, activation in zip(lines, ACTIVATIONS):
        np.testing.assert_array_equal(line.get_xdata(), DEPTHS)
        np.testing.assert_allclose(line.get_ydata(), expected[activation].to_numpy())
    (bound,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    np.testing.assert_allclose(bound.get_ydata(), 0.25 ** (np.array(bound.get_xdata()) - 1))
    np.testing.assert_array_equal(bound.get_xdata(), [2, 3])
    # the grads frame gives the same figure as its ratios
    again = plots.vanishing_ratio_plot(grads, ax=matplotlib.figure.Figure().add_subplot())
    np.testing.assert_allclose(data_lines(again)[0].get_ydata(), lines[0].get_ydata())
    assert any("0.25^(depth−1)" in t.get_text() for t in ax.get_legend().get_texts())


def test_act_grad_by_layer_leaves_out_the_output_layer(frames):
    grads, _ = frames
    fig = plots.act_grad_by_layer(grads)
    per_run = grads[(grads["epoch"] == 1) & (grads["layer"] < grads["depth"] - 1)].groupby(
        ["activation", "depth", "run_id", "layer"])["act_grad_mean"].mean()
    expected = per_run.groupby(["activation", "depth", "layer"]).mean()
    for ax, depth in zip(fig.axes, DEPTHS):
        assert ax.get_yscale() == "linear"
        for line, activation in zip(data_lines(ax), ACTIVATIONS):
            np.testing.assert_array_equal(line.get_xdata(), np.arange(depth - 1))
            np.testing.assert_allclose(line.get_ydata(), expected[activation, depth].to_numpy())
        (bound,) = [line for line in ax.lines if line.get_linestyle() == "--"]
        np.testing.assert_allclose(bound.get_ydata(), [0.25, 0.25])


def test_accuracy_by_epoch_rows_are_metrics(frames):
    _, epochs = frames
    fig = plots.accuracy_by_epoch(epochs)
    test = epochs[epochs["split"] == "test"]
    rows = grid(fig, len(DEPTHS))
    for row, metric in zip(rows, ("accuracy", "loss")):
        expected = test.groupby(["activation", "depth", "epoch"])[metric].mean()
        for ax, depth in zip(row, DEPTHS):
            for line, activation in zip(data_lines(ax), ACTIVATIONS):
                np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
                np.testing.assert_allclose(line.get_ydata(),
                                           expected[activation, depth].to_numpy())
    assert rows[0][0].get_ylabel() == "test accuracy"


def test_final_accuracy_table_mean_sd_over_seeds(frames):
    _, epochs = frames
    runs = epochs.drop_duplicates("run_id")[["run_id", "activation", "depth", "seed", "status"]]
    runs = pd.concat([runs, pd.DataFrame([dict(run_id="x", activation="relu", depth=2, seed=9,
                                               status="diverged")])], ignore_index=True)
    table = plots.final_accuracy_table(epochs, runs).set_index(["activation", "depth"])
    last = epochs[(epochs["split"] == "test") & (epochs["epoch"] == 3)]
    expected = last.groupby(["activation", "depth"])["accuracy"].agg(["mean", "std", "count"])
    np.testing.assert_allclose(table["mean"], expected["mean"])
    np.testing.assert_allclose(table["sd"], expected["std"])
    assert (table["seeds"] == expected["count"]).all()
    assert table.loc[("relu", 2), "diverged"] == 1 and table["diverged"].sum() == 1


def test_saturation_uses_saturated_or_dead_fraction_by_activation(frames):
    grads, _ = frames
    fig = plots.saturation_over_steps(grads, bins=None)
    rows = grid(fig, len(DEPTHS))
    for row, activation, column in zip(rows, ACTIVATIONS, ("dead_frac", "saturated_frac")):
        expected = grads.groupby(["activation", "depth", "layer", "step"])[column].mean()
        assert row[-1].texts[0].get_text().startswith(activation)
        for ax, depth in zip(row, DEPTHS):
            lines = data_lines(ax)
            assert len(lines) == depth - 1  # hidden layers only
            for layer, line in enumerate(lines):
                np.testing.assert_allclose(line.get_ydata(),
                                           expected[activation, depth, layer].to_numpy())


def test_diverged_runs_are_marked_and_non_finite_values_dropped(frames):
    grads = with_diverged(frames[0])
    for fig in (plots.grad_norm_by_layer(grads, epoch=None),
                plots.grad_norm_over_steps(grads, bins=None)):
        title = fig.get_suptitle().replace("\n", " ")
        assert "diverged" in title and "relu depth 3 seed 0 (step 4)" in title
        assert "3 non-finite grad_weight_norm values dropped" in title
        for ax in fig.axes:
            for line in data_lines(ax):
                assert np.isfinite(line.get_ydata()).all()
        marks = [c for ax in fig.axes for c in ax.collections
                 if isinstance(c, PathCollection)
                 and np.allclose(c.get_edgecolor()[0][:3], matplotlib.colors.to_rgb("crimson"))]
        assert marks, "diverged points drawn as red crosses"
        legend = fig.subfigs[1].legends[0]
        assert "diverged run" in [t.get_text() for t in legend.get_texts()]
    ratios = plots.vanishing_ratios(grads)
    row = ratios.set_index("run_id").loc["relu-3-0"]
    assert row["status"] == "diverged" and row["steps"] == 4 and row["dropped"] == 1


def test_style_is_set_only_inside_a_figure_call(frames):
    before = dict(matplotlib.rcParams)
    plots.grad_norm_by_layer(frames[0])
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} == set()


def test_missing_column_is_a_clear_error(frames):
    with pytest.raises(ValueError, match="no column 'nope'"):
        plots.grad_norm_by_layer(frames[0], y="nope")


# -- end to end: the session's tiny results folder (conftest's ``trained``) -----------------


# One figure of each way of drawing (layer_figure and steps_figure share their layout code with
# the other three), so that drawing twice in three formats stays within the test time budget.
TWICE = ("grad_norm_over_steps", "vanishing_ratio", "accuracy_by_epoch")


@pytest.mark.slow  # 18 files drawn
def test_plot_twice_gives_identical_bytes(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    outputs = []
    for folder in (trained, copy):
        r = invoke("plot", folder, "--format", "png,pdf,svg", "--only", ",".join(TWICE))
        assert r.exit_code == 0, r.output
        outputs.append({Path(p).name: Path(p).read_bytes() for p in r.stdout.split()})
    first, second = outputs
    assert first.keys() == second.keys() == {f"{n}.{f}" for n in TWICE
                                            for f in ("png", "pdf", "svg")}
    for name in first:
        assert first[name] == second[name], name
    assert first["vanishing_ratio.png"].startswith(b"\x89PNG")
    assert b"CreationDate" not in first["vanishing_ratio.pdf"]
    assert b"<dc:date>" not in first["vanishing_ratio.svg"]
    assert not list((trained / "figures").glob(".*"))  # no temporary files left


@pytest.mark.slow  # every figure drawn; --only draws two fast
def test_plot_writes_every_figure(trained):
    r = invoke("plot", trained)
    assert r.exit_code == 0, r.output
    assert [Path(p).name for p in r.stdout.split()] == [f"{n}.png" for n in plots.FIGURES]
    assert all(Path(p).stat().st_size > 10_000 for p in r.stdout.split())


def test_plot_only_and_bad_input(trained):
    r = invoke("plot", trained, "--only", "vanishing_ratio,accuracy_by_epoch")
    assert r.exit_code == 0, r.output
    assert [Path(p).name for p in r.stdout.split()] == ["vanishing_ratio.png",
                                                        "accuracy_by_epoch.png"]
    for args, needle in ((["--only", "nope"], "figure 'nope' is unknown"),
                         (["--format", "gif"], "format 'gif' is invalid")):
        r = invoke("plot", trained, *args)
        assert r.exit_code == 2 and r.output.strip().startswith("Error:") and needle in r.output
        assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_plot_bad_path_is_one_line(make, tmp_path):
    path = tmp_path / "p"
    if make == "file":
        path.write_text("x")
    elif make == "empty":
        (path / "runs").mkdir(parents=True)
    r = invoke("plot", path)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and str(path) in lines[0], r.output


def test_plot_warns_about_damaged_runs_and_goes_on(trained, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(trained, copy)
    runs = sorted((copy / "runs").iterdir())
    (runs[0] / "grads.parquet").write_bytes(b"not parquet")
    (runs[1] / "status.json").unlink()
    r = invoke("plot", copy, "--only", "vanishing_ratio")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning:")]
    assert any("grads.parquet" in w and "unreadable" in w for w in warnings), r.stderr
    assert any("unfinished" in w for w in warnings), r.stderr
    assert r.stdout.strip().endswith("vanishing_ratio.png")


def test_write_figures_rejects_unknown_names_before_loading(tmp_path):
    with pytest.raises(ConfigError):
        plots.write_figures(tmp_path / "nowhere", only=["nope"])
