"""Distribution records (gradlab.dists): each statistic equals torch.quantile / torch.histc
computed directly on the same tensors (taken independently by autograd), recording them changes
no loss, and they are stored and loaded as a tidy frame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from gradlab.config import ConfigError, make_config
from gradlab.models import build_mlp
from gradlab.record import dists as dmod
from gradlab.record.dists import QUANTILES, DistributionRecorder, histogram, quantile_sample
from gradlab.train import batch_loss, train


def reference_tensors(model, x, y):
    """Activations, dL/dz and dL/dW of each Linear, by autograd without any hook."""
    zs, acts, h = [], [], x
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for i, linear in enumerate(linears):
        z = linear(h)
        z.retain_grad()
        zs.append(z)
        h = z if i == len(linears) - 1 else model[2 * i + 1](z)
        if i < len(linears) - 1:
            acts.append(h.detach())
    F.cross_entropy(h, y).backward()
    return acts, [z.grad for z in zs], [m.weight.grad.clone() for m in linears]


def test_stats_equal_torch_quantile_and_histc():
    torch.manual_seed(0)
    model = build_mlp((784, 40, 30, 10), "tanh")
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    acts, gouts, gws = reference_tensors(model, x, y)
    model.zero_grad(set_to_none=True)
    with DistributionRecorder(model, [0], bins=20) as rec:
        assert rec.begin_step(0)
        F.cross_entropy(model(x), y).backward()
        rec.after_backward()
        frame = rec.flush(epoch=1)
    expected = {"activation": acts, "grad_output": gouts, "grad_weight": gws}
    levels = torch.tensor(QUANTILES)
    for quantity, tensors in expected.items():
        rows = frame[frame["quantity"] == quantity]
        assert sorted(rows["layer"].unique()) == list(range(len(tensors)))
        for layer, t in enumerate(tensors):
            lo, hi = t.min().item(), t.max().item()
            mine = rows[rows["layer"] == layer]
            q = mine[mine["stat"] == "quantile"].sort_values("q")
            np.testing.assert_allclose(q["q"], QUANTILES)
            np.testing.assert_allclose(q["value"], torch.quantile(t.flatten(), levels).numpy(),
                                       rtol=1e-6, atol=0)
            counts = mine[mine["stat"] == "count"].sort_values("bin_lo")
            ref = torch.histc(t.flatten(), bins=20, min=lo, max=hi)
            np.testing.assert_array_equal(counts["value"].to_numpy(), ref.numpy())
            assert counts["value"].sum() == t.numel()
            assert counts["bin_lo"].iloc[0] == pytest.approx(lo, rel=1e-6)
            assert counts["bin_hi"].iloc[-1] == pytest.approx(hi, rel=1e-6)
            mean = mine.loc[mine["stat"] == "mean", "value"].item()
            std = mine.loc[mine["stat"] == "std", "value"].item()
            assert mean == pytest.approx(t.double().mean().item(), rel=1e-9, abs=1e-15)
            assert std == pytest.approx(t.double().std().item(), rel=1e-9)
    assert (frame["epoch"] == 1).all()
    assert set(frame["layer_name"]) == {"fc0", "fc1", "fc2"}
    assert not frame.map(lambda v: isinstance(v, (list, np.ndarray))).any().any()  # tidy


def test_histogram_matches_histc_at_the_edges_and_skips_outside_and_nan():
    x = torch.tensor([0.0, 0.1, 0.5, 0.99999, 1.0, 1.5, -0.2, float("nan")])
    counts = histogram(x, torch.tensor(0.0), torch.tensor(1.0), 4)
    ref = torch.histc(x[~x.isnan()], bins=4, min=0.0, max=1.0)
    np.testing.assert_array_equal(counts.numpy(), ref.numpy())


def test_large_tensors_are_sampled_deterministically(monkeypatch):
    monkeypatch.setattr(dmod, "MAX_QUANTILE_INPUT", 1000)
    x = torch.arange(2500.0)
    sample = quantile_sample(x)
    assert len(sample) <= 1000 and torch.equal(sample, x[::3])


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_recording_distributions_changes_no_loss(tiny_data, activation):
    base = dict(depth=4, width=32, activation=activation, epochs=2, batch_size=64, lr=0.1,
                seed=3)
    off = train(make_config(**base), data=tiny_data, device="cpu")
    on = train(make_config(**base, dist_every=2), data=tiny_data, device="cpu")
    assert off.dists.empty
    pd.testing.assert_frame_equal(off.grads, on.grads)
    pd.testing.assert_frame_equal(off.epochs.drop(columns="seconds"),
                                  on.epochs.drop(columns="seconds"))
    steps = sorted(on.dists["step"].unique())
    assert steps == list(range(0, on.steps, 2))
    assert set(on.dists["epoch"]) == {1, 2}


def test_log_spaced_schedule_and_store_roundtrip(tiny_data, tmp_path):
    from gradlab.store import begin_run, finish_run, load

    config = make_config(depth=3, width=16, epochs=1, batch_size=16, dist_every=1,
                         dist_log_spaced=True)
    result = train(config, data=tiny_data, device="cpu")
    assert sorted(result.dists["step"].unique()) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13,
                                                     14]
    path = begin_run(tmp_path, config, "cpu")
    finish_run(path, result)
    loaded = load(tmp_path)
    assert len(loaded.dists) == len(result.dists)
    assert {"run_id", "depth", "activation", "quantity", "stat", "q", "value"} <= set(
        loaded.dists.columns)
    # a run without distributions has no dists.parquet, and loads with an empty frame
    other = make_config(depth=3, width=16, epochs=1, batch_size=16, seed=1)
    finish_run(begin_run(tmp_path / "b", other, "cpu"), train(other, data=tiny_data,
                                                               device="cpu"))
    assert not (tmp_path / "b" / "runs" / other.run_id() / "dists.parquet").exists()
    assert load(tmp_path / "b").dists.empty


def test_new_options_validate_and_keep_old_run_ids():
    same = make_config(depth=3, dist_every=0, criterion="cross_entropy", dist_log_spaced=False)
    assert make_config(depth=3).run_id() == same.run_id()
    assert make_config(dist_every=5).run_id() != make_config().run_id()
    assert make_config(criterion="sigmoid_bce").run_id() != make_config().run_id()
    with pytest.raises(ConfigError, match="dist_every"):
        make_config(dist_every=-1)
    with pytest.raises(ConfigError, match="criterion='mse' is invalid"):
        make_config(criterion="mse")
    with pytest.raises(ConfigError, match="engine='fused' is invalid: dist_every=10 needs"):
        make_config(engine="fused", dist_every=10)
    with pytest.raises(ConfigError, match="criterion='sigmoid_bce' needs"):
        make_config(engine="fused", criterion="sigmoid_bce")


def test_sigmoid_bce_is_network2s_cross_entropy_cost():
    """Nielsen's CrossEntropyCost: sum over outputs of -y ln a - (1-y) ln(1-a), a = sigmoid(z),
    averaged over the examples; its dC/dz is (a - y) / n."""
    torch.manual_seed(0)
    z = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 9, 3, 1])
    target = F.one_hot(y, 10).double()
    a = torch.sigmoid(z)
    cost = (-(target * a.log()) - (1 - target) * (1 - a).log()).sum() / 5
    loss = batch_loss("sigmoid_bce", z, y)
    assert loss.item() == pytest.approx(cost.item(), rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(z.grad.numpy(), ((a - target) / 5).detach().numpy(), rtol=1e-10)


def test_cli_dist_every_and_criterion(tmp_path, fake_mnist):
    from click.testing import CliRunner

    from gradlab.cli import cli
    from gradlab.store import load

    args = ["train", "--depth", "3", "--width", "8", "--epochs", "1", "--train-size", "128",
            "--data-dir", str(fake_mnist), "--out", str(tmp_path), "--device", "cpu"]
    r = CliRunner().invoke(cli, [*args, "--dist-every", "3", "--criterion", "sigmoid_bce"])
    assert r.exit_code == 0, r.output
    results = load(tmp_path)
    assert sorted(results.dists["step"].unique()) == [0]  # 2 steps of 64: step 0 only
    assert (results.runs["criterion"] == "sigmoid_bce").all()
    r = CliRunner().invoke(cli, [*args, "--engine", "fused", "--dist-every", "3"])
    assert r.exit_code != 0
    assert "dist_every=3 needs engine 'autograd'" in r.output
    assert "Traceback" not in r.output


def test_paper_figures_draw_frames_without_facet_columns(tiny_data):
    import matplotlib.pyplot as plt

    from gradlab.paper_figures import dist_histograms, dist_percentiles, speed_of_learning

    result = train(make_config(depth=4, width=16, epochs=1, dist_every=4), data=tiny_data,
                   device="cpu")
    bare = result.dists.drop(columns=["layer_name"])  # no run_id, setup, depth or seed
    for fig in (dist_histograms(bare, quantity="grad_output", col="setup"),
                dist_percentiles(bare, col=None)):
        assert len(fig.axes[0].lines) >= 3  # a line per layer (and its percentiles)
        plt.close(fig)
    fig = speed_of_learning(result.grads.drop(columns=["layer_name"], errors="ignore"),
                            hue="depth")
    assert list(fig.axes[0].lines[0].get_xdata()) == [1, 2, 3]  # the three hidden layers
    plt.close(fig)


def test_distributions_record_the_modules_chosen_as_the_gradient_recorder_does():
    """``modules=`` chooses the layers as ``GradientRecorder``'s does (here a Conv2d too), and
    the hooks are gone after the block."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 10))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with DistributionRecorder(model, [0], modules=(nn.Conv2d, nn.Linear)) as dists:
        dists.begin_step(0)
        F.cross_entropy(model(x), y).backward()
        dists.after_backward()
        frame = dists.flush(1)
    assert list(frame.drop_duplicates("layer")["layer_name"]) == ["0", "3"]
    weights = frame[(frame.quantity == "grad_weight") & (frame.stat == "quantile")]
    conv = weights[weights.layer_name == "0"].set_index("q")["value"]
    expected = torch.quantile(model[0].weight.grad.reshape(-1), torch.tensor(QUANTILES))
    np.testing.assert_allclose(conv.to_numpy(), expected.numpy(), rtol=1e-6)
    assert not model[0]._forward_hooks and not model[3]._forward_hooks
