import numpy as np
import pandas as pd
import pytest
import torch

from gradlab.config import make_config
from gradlab.train import train


def run(tiny_data, **kw):
    config = make_config(**{"depth": 3, "width": 32, "epochs": 2, "batch_size": 32, **kw})
    return train(config, data=tiny_data, device="cpu")


def test_same_seed_same_losses_and_records(tiny_data):
    a, b = run(tiny_data, seed=3), run(tiny_data, seed=3)
    pd.testing.assert_frame_equal(a.epochs.drop(columns="seconds"),
                                  b.epochs.drop(columns="seconds"))
    pd.testing.assert_frame_equal(a.grads, b.grads)
    c = run(tiny_data, seed=4)
    assert not np.array_equal(a.grads["loss"], c.grads["loss"])


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_recording_does_not_change_training(tiny_data, activation):
    on = run(tiny_data, activation=activation, log_every=1)
    off = run(tiny_data, activation=activation, log_every=0)
    sparse = run(tiny_data, activation=activation, log_every=3)
    cols = ["epoch", "split", "loss", "accuracy"]
    pd.testing.assert_frame_equal(on.epochs[cols], off.epochs[cols])
    pd.testing.assert_frame_equal(on.epochs[cols], sparse.epochs[cols])
    assert len(off.grads) == 0
    # every step recorded, one row per layer; the loss column equals the sparse run's
    steps = on.grads["step"].unique()
    assert list(steps) == list(range(on.steps))
    merged = sparse.grads.merge(on.grads, on=["step", "layer"], suffixes=("_s", "_a"))
    assert len(merged) == len(sparse.grads)
    assert (merged["loss_s"] == merged["loss_a"]).all()
    assert (merged["grad_weight_norm_s"] == merged["grad_weight_norm_a"]).all()


def test_training_learns_and_epoch_rows(tiny_data):
    result = run(tiny_data, activation="relu", epochs=3, lr=0.1)
    assert result.status == "complete"
    assert list(result.epochs["split"]) == ["train", "test"] * 3
    test = result.epochs[result.epochs["split"] == "test"]
    assert test["accuracy"].iloc[-1] > 0.5
    assert result.steps == 3 * 8


def test_gradient_clipping_records_the_raw_gradient(tiny_data):
    clipped = run(tiny_data, clip_grad_norm=1e-3, epochs=1)
    raw = run(tiny_data, epochs=1)
    first = lambda r: r.grads[r.grads["step"] == 0]["grad_weight_norm"].to_numpy()  # noqa: E731
    assert np.allclose(first(clipped), first(raw))  # step 0 is the same gradient
    assert first(clipped).max() > 1e-3  # ...and above the clip norm: recorded before clipping
    later = clipped.grads[clipped.grads["step"] == 5]["update_ratio"].to_numpy()
    assert later.max() < raw.grads[raw.grads["step"] == 5]["update_ratio"].max()


def test_divergence_is_detected_and_records_kept(tiny_data):
    result = run(tiny_data, init="normal:1", lr=10.0, activation="elu", epochs=3)
    assert result.status == "diverged"
    assert result.diverged_step is not None
    assert result.grads["step"].max() == result.diverged_step
    assert not np.isfinite(result.grads["loss"].iloc[-1])
    assert (result.epochs["epoch"] < 1 + result.diverged_step // 8 + 1).all()


def test_caller_rng_untouched(tiny_data):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    run(tiny_data, epochs=1)
    assert torch.equal(torch.rand(1), before)
