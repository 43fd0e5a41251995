"""Claims tables: each measure against a value computed by hand from a synthetic record, the
verdicts, spec validation as one-line errors, and the table in summary.md, claims.csv and
``gradlab report``; the exploding-summary fixes (complete runs only, unset options "off")."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from gradlab.claims import evaluate_claims, verdict
from gradlab.cli import cli
from gradlab.experiment import SpecError, load_spec, options_off
from gradlab.store import Results


def synthetic_results() -> Results:
    """Two complete runs (seeds 0, 1) and a diverged one of a depth-4 net, widths 8,4,2."""
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "seed": [0, 1, 2], "depth": 4,
                         "widths": "8,4,2", "init": "xavier_normal",
                         "status": ["complete", "complete", "diverged"]})
    rows = []
    for run, scale in (("a", 1.0), ("b", 2.0), ("c", 100.0)):
        for step in (0, 1, 2):
            for layer in range(4):
                rows.append({"run_id": run, "step": step, "layer": layer, "depth": 4,
                             "grad_bias_norm": scale * (layer + 1) * (step + 1),
                             "grad_weight_norm": scale * 10.0 ** layer,
                             "grad_output_norm": scale * 2.0 ** layer})
    grads = pd.DataFrame(rows)
    epochs = pd.DataFrame({"run_id": ["a", "a", "b"], "split": "test", "epoch": [1, 2, 2],
                           "accuracy": [0.5, 0.9, 0.8]})
    dists = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "depth": 4, "step": 0,
                          "layer": [0, 2, 0, 2], "quantity": "activation", "stat": "quantile",
                          "q": 0.5, "value": [0.2, 0.6, 0.4, 0.8]})
    return Results(grads, epochs, runs, [], dists)


def claim(**kw):
    return {"claim": "c", "source": "s", "published": 1.0, "expect": {"below": 1e9}, **kw}


def test_measures_equal_hand_computed_values():
    results = synthetic_results()
    claims = [
        claim(measure="grad_at_layer", column="grad_bias_norm", layer=1, step=2),
        claim(measure="grad_at_layer", column="grad_bias_norm", layer=-2, step="median"),
        claim(measure="layer_ratio", column="grad_weight_norm", layer=0, of_layer=-1),
        claim(measure="variance_factor", layer=0, of_layer=2),
        claim(measure="final_test", stat="error"),
        claim(measure="dist_stat", layer=-2, q=0.5, runs={"seed": [0, 1]}),
        claim(measure="dist_stat", layer=0, q=0.5, runs={"seed": 1}),
        claim(measure="dist_stat", layer=2, of_layer=0, q=0.5),
        claim(measure="layer_product", column="grad_output_norm", layer=1, step=0),
    ]
    table = evaluate_claims(claims, results)
    # grad_bias_norm of layer 1 at step 2 = scale*2*3: 6 and 12; the diverged run is left out
    assert table.loc[0, "mean"] == 9 and table.loc[0, "sd"] == pytest.approx(np.std([6, 12],
                                                                                    ddof=1))
    assert table.loc[0, "runs"] == 2
    assert table.loc[1, "mean"] == pytest.approx((6 + 12) / 2)  # layer 2, median step 1: 3*2*s
    assert table.loc[2, "mean"] == pytest.approx(1e-3)
    # variance per unit: (s 2^l)^2 / width_l; from layer 2 (width 2) to 0 (width 8), 2 layers
    expected = ((1 / 8) / (16 / 2)) ** (1 / 2)
    assert table.loc[3, "mean"] == pytest.approx(expected)
    assert table.loc[4, "mean"] == pytest.approx((10 + 20) / 2)
    assert table.loc[5, "mean"] == pytest.approx(0.7)
    assert table.loc[6, "mean"] == pytest.approx(0.4) and math.isnan(table.loc[6, "sd"])
    assert table.loc[6, "gradlab"] == "0.4 (n=1)"
    assert table.loc[7, "mean"] == pytest.approx((0.6 / 0.2 + 0.8 / 0.4) / 2)
    # layers 1 and 2 (of_layer -1 = 3 excluded): s 2^1 * s 2^2 = 8 s^2, s = 1 and 2
    assert table.loc[8, "mean"] == pytest.approx((8 + 32) / 2)


def test_verdicts():
    assert verdict(claim(published=2.0, expect={"within": 0.1}), 2.1) == "holds"
    assert verdict(claim(published=2.0, expect={"within": 0.1}), 2.5) == "does not hold"
    assert verdict(claim(expect={"between": [1, 2]}, differs="fewer epochs"), 3) == \
        "differs because fewer epochs"
    assert verdict(claim(expect={"above": 90}), 95) == "holds"
    assert verdict(claim(expect={"below": 0.5}), math.nan) == "no runs to measure"


SPEC = """
description = "tiny claims"
[[sweep]]
depth = 3
width = 8
activation = "sigmoid"
epochs = 1
train_size = 256
seed = [0, 1]
dist_every = 2
[figures]
only = ["grad_norm_by_layer", "activation_histograms", "activation_percentiles",
        "speed_of_learning", "backward_variance", "grad_output_histograms"]
[[claim]]
claim = "gradients shrink toward the input"
source = "a tutorial"
published = "< 1"
measure = "layer_ratio"
expect = { below = 1.0 }
[[claim]]
claim = "the net learns"
source = "hope"
published = 99
measure = "final_test"
expect = { within = 0.01 }
differs = "one epoch of fake data"
"""


@pytest.mark.slow  # an experiment build
def test_build_writes_claims_first_and_report_shows_them(tmp_path, fake_mnist):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["figures", str(spec), "--out", str(out), "--data-dir",
                                 str(fake_mnist)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = (out / "summary.md").read_text()
    assert text.index("## Claims, checked") < text.index("## Summary")
    assert "| gradients shrink toward the input | a tutorial | < 1 |" in text
    assert "differs because one epoch of fake data" in text
    assert "step 0" in text  # the step-0 vanishing ratios beside the training medians
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims["runs"]) == [2, 2]
    for name in ("activation_histograms", "activation_percentiles", "speed_of_learning",
                 "backward_variance", "grad_output_histograms", "grad_norm_by_layer"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    assert not (out / "figures" / "accuracy_by_epoch.png").exists()
    r = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert "What the literature says, checked" in page and "the net learns" in page


@pytest.mark.parametrize("extra, needle", [
    ('[[claim]]\nclaim = "x"\nsource = "y"\nmeasure = "nope"\nexpect = { below = 1 }',
     "measure='nope' is invalid"),
    ('[[claim]]\nclaim = "x"\nsource = "y"\nmeasure = "final_test"\nexpect = { near = 1 }',
     "expect={'near': 1} is invalid"),
    ('[[claim]]\nclaim = "x"\nsource = "y"\nmeasure = "final_test"\nexpect = { below = 1 }'
     '\nruns = { colour = "red" }', "runs={'colour': 'red'} is invalid"),
    ('[[claim]]\nclaim = "x"\nsource = "y"\nmeasure = "final_test"\nexpect = { below = 1 }'
     '\nwhy = 1', "unknown key 'why'"),
    ('[[claim]]\nclaim = "x"\nmeasure = "final_test"\nexpect = { below = 1 }', "needs 'source'"),
    ('[[claim]]\nclaim = "x"\nsource = "y"\nmeasure = "final_test"\npublished = "1 %"\n'
     'expect = { within = 0.1 }', "within needs a numeric published"),
])
def test_bad_claims_are_one_line_spec_errors(tmp_path, extra, needle):
    spec = tmp_path / "bad.toml"
    spec.write_text('[[sweep]]\ndepth = 2\nepochs = 1\n' + extra + "\n")
    with pytest.raises(SpecError, match="claim\\]\\] 1: ") as e:
        load_spec(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unset_options_read_off():
    table = pd.DataFrame({"clip_grad_norm": [10.0, math.nan], "depth": [6, 6]})
    assert list(options_off(table)["clip_grad_norm"]) == [10.0, "off"]
