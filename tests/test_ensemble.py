"""``train_ensemble`` against each run trained alone with ``gradlab.train.train``."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradlab.config import ConfigError, make_config
from gradlab.engines.ensemble import train_ensemble
from gradlab.engines.members import train_members
from gradlab.train import train

NUMERIC = ["loss", "accuracy"]


def configs(seeds, **kw):
    return [make_config(**{"depth": 3, "width": 32, "epochs": 2, "batch_size": 48, "seed": s,
                           **kw}) for s in seeds]


def assert_matches_solo(ensemble, solo):
    assert ensemble.status == solo.status
    assert ensemble.diverged_step == solo.diverged_step
    assert ensemble.steps == solo.steps
    pd.testing.assert_frame_equal(ensemble.epochs[["epoch", "split", "step"]],
                                  solo.epochs[["epoch", "split", "step"]])
    np.testing.assert_allclose(ensemble.epochs[NUMERIC].to_numpy(float),
                               solo.epochs[NUMERIC].to_numpy(float), rtol=1e-4)
    assert list(ensemble.grads.columns) == list(solo.grads.columns)
    keys = ["step", "epoch", "layer", "layer_name"]
    pd.testing.assert_frame_equal(ensemble.grads[keys], solo.grads[keys])
    np.testing.assert_allclose(ensemble.grads.drop(columns=keys).to_numpy(float),
                               solo.grads.drop(columns=keys).to_numpy(float),
                               rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("options", [
    dict(activation="sigmoid"),
    dict(activation="relu", log_every=3, momentum=0.9),
    dict(activation="gelu", optimizer="adam", lr=0.003, clip_grad_norm=0.5),
    dict(activation="tanh", log_every=0, weight_decay=0.01),
])
def test_each_member_matches_its_solo_run(tiny_data, options):
    runs = configs([0, 1, 7], **options)
    results = train_ensemble(runs, data=tiny_data, device="cpu")
    assert [r.config for r in results] == runs
    for config, result in zip(runs, results, strict=True):
        assert result.extra["ensemble_size"] == 3  # tiny nets: one group
        assert_matches_solo(result, train(config, data=tiny_data, device="cpu"))
    # each member has its own initialisation and batch order
    assert not np.allclose(results[0].epochs["loss"], results[1].epochs["loss"])


def test_a_diverging_member_does_not_disturb_the_others(tiny_data):
    runs = configs([0, 1, 2], activation="elu", init="normal:0.3", lr=2.0, epochs=3)
    results = train_ensemble(runs, data=tiny_data, device="cpu")
    assert [r.status for r in results] == ["complete", "diverged", "complete"]
    for config, result in zip(runs, results, strict=True):
        # near divergence the two backward passes' rounding grows apart, so the reference is
        # the same engine with this member alone: the others must not change it
        solo = train_members([config], tiny_data, torch.device("cpu"))[0]
        if result.status == "complete":
            assert_matches_solo(result, solo)
        else:  # float noise grows without bound on the way to inf: compare the facts
            assert (result.status, result.diverged_step, result.steps) == (
                solo.status, solo.diverged_step, solo.steps)
            assert result.grads["step"].max() == result.diverged_step
            pd.testing.assert_frame_equal(result.epochs.drop(columns="seconds"),
                                          solo.epochs.drop(columns="seconds"), rtol=1e-4)


def test_groups_on_cpu(tiny_data, monkeypatch):
    """Runs too large to stack in one cache-sized group are trained in groups, in order."""
    monkeypatch.setattr("gradlab.engines.ensemble.CPU_GROUP_BYTES", 2 * 8 * 26_506)  # two members
    runs = configs([0, 1, 2, 3, 4], epochs=1)
    results = train_ensemble(runs, data=tiny_data, device="cpu")
    assert [r.extra["ensemble_size"] for r in results] == [2, 2, 2, 2, 1]
    for config, result in zip(runs, results, strict=True):
        assert result.config == config
        assert_matches_solo(result, train(config, data=tiny_data, device="cpu"))


def test_a_single_member_is_a_solo_run(tiny_data):
    (run,) = configs([3])
    (result,) = train_ensemble([run], data=tiny_data, device="cpu")
    assert_matches_solo(result, train(run, data=tiny_data, device="cpu"))


def test_configs_must_agree_but_for_the_seed(tiny_data):
    with pytest.raises(ConfigError, match="at least one"):
        train_ensemble([], data=tiny_data, device="cpu")
    runs = configs([0, 1]) + configs([2], lr=0.5)
    with pytest.raises(ConfigError, match="lr=0.5 is invalid: .* differ only in seed"):
        train_ensemble(runs, data=tiny_data, device="cpu")
    with pytest.raises(ConfigError, match="widths"):
        train_ensemble(configs([0]) + configs([1], width=16), data=tiny_data, device="cpu")
