"""Issue 30: ``gradlab sweep --depths 3,5,10`` tells the whole story. Its preset is the
quickstart's runs and stays a grid that options override; ``--widths`` means one net's hidden
widths in train and sweep alike; the sweep ends with its figures and the next command; the ETA
says "estimating" until the step rate is known; 0.25^(depth−1) is called what it is (the
product of σ′'s largest value over the layers), never a bound, in words and figures; the report
has no empty section; the quickstart's claims are checked against its records."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradlab.claims import claims_section
from gradlab.config import expand_grids, make_config
from gradlab.experiment import load_spec
from gradlab.presets import STORY_SETUPS, sweep_grids, widths_note
from gradlab.progress import ESTIMATING, WARM_SECONDS, SweepProgress
from gradlab.tables import slope_product_line, verdict

from .helpers import invoke

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--train-sizes", "64", "--jobs", "1"]  # fake MNIST has 512 examples


def story(**given) -> list:
    return expand_grids(sweep_grids(given))


# -- the preset ---------------------------------------------------------------------------------


def test_the_bare_sweep_trains_the_quickstarts_runs():
    """``gradlab sweep --depths 3,5,10``: sigmoid, ReLU and ReLU with Kaiming init, the very
    runs of experiments/quickstart.toml (so the README's numbers are the sweep's)."""
    runs = story(depth=[3, 5, 10])
    quickstart = load_spec(ROOT / "experiments" / "quickstart.toml").configs()
    assert {c.run_id() for c in runs} == {c.run_id() for c in quickstart}
    assert story() == runs  # the depths are the preset's too
    assert {(c.activation, c.init) for c in runs} == set(STORY_SETUPS)


def test_each_option_given_replaces_the_presets_values():
    assert len(story(seed=[0, 1, 2])) == 27
    assert {c.epochs for c in story(epochs=[1])} == {1}
    tanh = story(activation=["tanh"])  # the user's setups: the init is train's default
    assert {(c.activation, c.init) for c in tanh} == {("tanh", "default")}
    xavier = story(init=["xavier_normal"])  # the story's activations with the init given
    assert {(c.activation, c.init) for c in xavier} == {("sigmoid", "xavier_normal"),
                                                         ("relu", "xavier_normal")}
    (plain,) = expand_grids(sweep_grids({}, "train"))
    assert plain == make_config()  # --preset train: gradlab train's defaults


def test_widths_give_the_depth_and_replace_the_presets_width():
    runs = story(widths=[[64, 32, 16]])
    assert {(c.depth, c.widths) for c in runs} == {(4, (64, 32, 16))}
    assert {c.widths for c in story(width=[64], depth=[3])} == {(64, 64)}
    assert make_config(widths=[16, 8, 4]).depth == 4  # the same in gradlab train


# -- one meaning for --widths ---------------------------------------------------------------------


def test_widths_mean_the_same_in_train_and_sweep(fake_mnist, tmp_path):
    """``gradlab train --widths 16,8`` and ``gradlab sweep --widths 16,8``: one net, 784→16→8→10,
    the same run (the sweep's --preset train gives every other option train's default)."""
    r = invoke("train", "--widths", "16,8", "--epochs", 1, "--train-size", 64, "--data-dir",
               fake_mnist, "--out", tmp_path / "t", "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("sweep", "--preset", "train", "--widths", "16,8", *TINY, "--data-dir",
               fake_mnist, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    (a,) = (p for p in (tmp_path / "t" / "runs").iterdir() if p.is_dir())
    (b,) = (p for p in (tmp_path / "s" / "runs").iterdir() if p.is_dir())
    assert a.name == b.name
    config = json.loads((b / "config.json").read_text())["config"]
    assert (config["depth"], config["widths"]) == (3, [16, 8])
    pd.testing.assert_frame_equal(pd.read_parquet(a / "grads.parquet"),
                                  pd.read_parquet(b / "grads.parquet"))


def test_the_old_spelling_is_one_line_naming_the_new_one(fake_mnist, tmp_path):
    r = invoke("sweep", "--depths", "3", "--layer-widths", "16,8", *TINY, "--data-dir",
               fake_mnist, "--out", tmp_path / "o")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "--layer-widths is now --widths" in r.output and not (tmp_path / "o").exists()


def test_widths_that_do_not_fit_the_depths_name_width(fake_mnist, tmp_path):
    """``--widths 8`` at depth 3 once meant width 8 everywhere: now it is refused, and the line
    names --width, which says that."""
    r = invoke("sweep", "--depths", "3", "--widths", "8", *TINY, "--data-dir", fake_mnist,
               "--out", tmp_path / "o")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "depth 3 needs 2 hidden widths" in r.output and "--width" in r.output


def test_one_widths_list_says_what_it_trains():
    note = widths_note({"widths": [[64, 128]]})
    assert "784→64→128→10" in note and "--width 64,128" in note
    assert widths_note({"widths": [[8]]}) is None  # at depth 2, both readings are one net
    assert widths_note({"widths": [[8, 8], [4, 4]]}) is None  # ';' was never the old meaning


# -- the end of a sweep ----------------------------------------------------------------------------


def test_a_sweep_ends_with_its_figures_and_the_next_command(fake_mnist, tmp_path):
    out = tmp_path / "story"
    r = invoke("sweep", "--depths", "2,3", "--width", "8", *TINY, "--data-dir", fake_mnist,
               "--out", out)
    assert r.exit_code == 0, r.output
    for setup in ("sigmoid, init=default", "relu, init=default", "relu, init=kaiming_normal"):
        assert setup in r.output
    for name in ("vanishing_ratio", "accuracy_by_epoch"):
        path = out / "figures" / f"{name}.png"
        assert path.stat().st_size > 0 and str(path) in r.output
    assert f"next: gradlab report {out}" in r.output
    assert "0.25^(depth−1)" in r.output and "bound" not in r.output.lower()


# -- the ETA --------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_eta_says_estimating_until_the_step_rate_is_warm(tmp_path):
    runs = [make_config(depth=2, width=8, epochs=1, train_size=6400, batch_size=64)]
    clock, stream = Clock(), io.StringIO()
    progress = SweepProgress(runs, tmp_path, stream=stream, every=0, clock=clock)
    progress.on_start(1, 0)
    run_id = runs[0].run_id()
    clock.now += 20  # a slow start (imports, data): no rate can be taken from it
    progress.on_progress(run_id, 10, 100)
    clock.now += WARM_SECONDS - 1
    progress.on_progress(run_id, 20, 100)
    clock.now += 1
    progress.on_progress(run_id, 30, 100)  # 20 steps in WARM_SECONDS: 70 left take 17.5 s
    lines = stream.getvalue().splitlines()
    assert lines[1].endswith(ESTIMATING) and lines[2].endswith(ESTIMATING)
    assert lines[3].endswith("00:17 left"), lines[3]


# -- 0.25^(depth−1), in words and figures ---------------------------------------------------------


def test_the_words_say_what_the_slope_product_is_and_where_the_ratio_is_above_it():
    ratio = pd.Series([0.155, 1e-3, 5e-8],
                      index=pd.MultiIndex.from_product([["sigmoid"], [3, 5, 10]]))
    line = slope_product_line(ratio, ["sigmoid"])
    assert "product of σ′'s largest value" in line and "bound" not in line.lower()
    assert "above it for sigmoid at depth 3." in line


def test_the_verdict_of_sigmoid_runs_ends_with_that_line():
    runs = pd.DataFrame({"run_id": ["a", "b"], "depth": [2, 3], "activation": "sigmoid",
                         "status": "complete"})
    grads = pd.DataFrame([{"run_id": r, "depth": d, "activation": "sigmoid", "step": 0,
                           "layer": layer, "grad_weight_norm": 10.0 ** -layer}
                          for r, d in (("a", 2), ("b", 3)) for layer in range(d)])
    lines = verdict(grads, pd.DataFrame(), runs)
    assert lines[-1].startswith("0.25^(depth−1)") and "above it" in lines[-1]


def test_the_vanishing_figure_labels_the_line_for_what_it_is():
    from gradlab.plots import vanishing_ratio

    ratios = pd.DataFrame({"run_id": list("abcd"), "depth": [2, 3, 2, 3],
                           "activation": ["sigmoid", "sigmoid", "relu", "relu"],
                           "vanishing_ratio": [0.1, 0.01, 1.0, 1.0]})
    fig = vanishing_ratio(ratios).get_figure(root=True)
    texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    assert any("max σ′" in t and "multiplied over the layers" in t for t in texts), texts
    assert not any("bound" in t.lower() for t in texts)
    (line,) = [ln for ax in fig.axes for ln in ax.lines if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(line.get_ydata(), 0.25 ** (np.asarray(line.get_xdata()) - 1))


# -- the report and the quickstart's claims -------------------------------------------------------


def test_a_report_has_no_claims_section_without_claims(tmp_path):
    (tmp_path / "claims.csv").write_text("claim,source,published,mean,sd,runs,gradlab,verdict\n")
    assert claims_section(tmp_path) == ""


def test_the_quickstart_states_its_claims_and_its_records_hold_them():
    """The committed claims.csv is the spec's claims, computed from the records by ``gradlab
    figures``: sigmoid vanishes from depth 5, ReLU with Kaiming keeps its gradient at depth 10,
    ReLU with the default init loses it there; the tutorial's 0.25^2 is no limit on the ratio."""
    spec = load_spec(ROOT / "experiments" / "quickstart.toml")
    table = pd.read_csv(ROOT / "results" / "quickstart" / "claims.csv",
                        keep_default_na=False)
    assert list(table["claim"]) == [c["claim"] for c in spec.claims]
    verdicts = dict(zip(table["claim"], table["verdict"], strict=True))
    for words in ("Sigmoid, depth 5: the first layer's gradient vanishes",
                  "Sigmoid, depth 10: the first layer's gradient vanishes",
                  "ReLU with Kaiming init, depth 10: the first layer keeps its gradient",
                  "ReLU with PyTorch's default init, depth 10: the first layer's gradient "
                  "vanishes"):
        (claim,) = [c for c in verdicts if c.startswith(words)]
        assert verdicts[claim] == "holds", claim
    (limit,) = [c for c in verdicts if "at most 0.25^2 = 0.0625" in c]
    assert verdicts[limit].startswith("differs because 0.25^(depth−1) is the product")


@pytest.mark.parametrize("command", ["sweep", "train"])
def test_help_calls_no_number_a_bound(command):
    from .test_progress import help_text

    assert "bound" not in help_text(command).lower()
