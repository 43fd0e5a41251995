"""The parameterised weight inits of signal-propagation work: ``normal_fan_in:SW2`` (the mean-field
σ_w²) and ``orthogonal:GAIN``; their errors; and that adding them left every earlier init's
weights and every earlier config's run_id as they were."""

import math

import pytest
import torch
from torch import nn

from gradlab.config import ConfigError, make_config, parse_init
from gradlab.models import build_mlp, linear_layers

from . import helpers


@pytest.mark.parametrize("sw2", [0.5, 1.0, 2.0, 3.0])
def test_normal_fan_in_variance_is_sw2_over_fan_in(sw2):
    torch.manual_seed(0)
    # layers of different fan_in (784, 1000, 300): each scales by its own input width
    model = build_mlp((784, 1000, 300, 10), "tanh", f"normal_fan_in:{sw2}", "zeros")
    for layer in linear_layers(model)[:3]:
        w = layer.weight.double()
        n = w.numel()
        expected = sw2 / layer.in_features
        # sample variance of n Gaussian draws: relative sd sqrt(2/n) (< 0.2 % here); 5 sd
        assert abs(w.var().item() / expected - 1) < 5 * math.sqrt(2 / n)
        assert abs(w.mean().item()) < 5 * math.sqrt(expected / n)
        # Gaussian, not uniform: kurtosis 3 (a uniform's is 1.8), within ~5 sd of sqrt(24/n)
        kurt = ((w - w.mean()) ** 4).mean().item() / w.var().item() ** 2
        assert abs(kurt - 3) < 5 * math.sqrt(24 / n)


def test_normal_fan_in_1_has_lecun_normals_law_and_bias_normal_is_independent():
    torch.manual_seed(1)
    a = linear_layers(build_mlp((500, 400, 10), "tanh", "normal_fan_in:1", "normal:0.3"))
    assert abs(a[0].weight.std().item() * math.sqrt(500) - 1) < 0.01
    assert abs(a[0].bias.std().item() - 0.3) < 0.05  # 400 draws


@pytest.mark.parametrize("gain", [0.5, 1.0, 1.7])
def test_orthogonal_gain(gain):
    torch.manual_seed(0)
    w = linear_layers(build_mlp((64, 64, 10), "tanh", f"orthogonal:{gain}"))[0].weight.double()
    assert torch.allclose(w @ w.T, gain**2 * torch.eye(64, dtype=torch.float64), atol=1e-5)
    # a wide (fewer rows than columns) layer: orthonormal rows times gain
    w = linear_layers(build_mlp((784, 64, 10), "tanh", f"orthogonal:{gain}"))[0].weight.double()
    assert torch.allclose(w @ w.T, gain**2 * torch.eye(64, dtype=torch.float64), atol=1e-5)


def test_orthogonal_1_is_plain_orthogonal_same_weights_same_run():
    assert make_config(init="orthogonal:1").init == "orthogonal"
    assert make_config(init="orthogonal:1.0").run_id() == make_config(init="orthogonal").run_id()
    assert make_config(init="orthogonal:2").run_id() != make_config(init="orthogonal").run_id()
    weights = []
    for spec in ("orthogonal", "orthogonal:1"):
        torch.manual_seed(5)
        weights.append([m.weight for m in linear_layers(build_mlp((50, 40, 10), "tanh", spec))])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_plain_orthogonal_is_torchs_own_call():
    # the reference: nn.Linear's own draw, then torch's orthogonal_ with its default gain
    torch.manual_seed(9)
    ref = nn.Linear(30, 20)
    nn.init.orthogonal_(ref.weight)
    torch.manual_seed(9)
    (first, _) = linear_layers(build_mlp((30, 20, 10), "tanh", "orthogonal"))
    assert torch.equal(first.weight, ref.weight) and torch.equal(first.bias, ref.bias)


# run_ids of configs with the inits as they were before normal_fan_in and orthogonal:GAIN
# (computed by the code at commit 72a49fb): the committed experiments' run folders are named by
# them, so they must never change.
@pytest.mark.parametrize("values, run_id", [
    ({}, "aa73253713c4"),
    ({"init": "orthogonal"}, "26810ec044ad"),
    ({"init": "kaiming_normal", "activation": "relu", "depth": 10}, "fa56e6b1b8ae"),
    ({"init": "normal:0.5", "bias_init": "normal:0.2"}, "fb40d4a8475e"),
])
def test_earlier_run_ids_unchanged(values, run_id):
    assert make_config(**values).run_id() == run_id


def test_normal_fan_in_canonical_and_distinct():
    a = make_config(init="normal_fan_in:1.50")
    assert a.init == "normal_fan_in:1.5"
    assert a.run_id() == make_config(init="normal_fan_in:1.5").run_id()
    assert a.run_id() != make_config(init="normal_fan_in:2").run_id()
    assert parse_init("normal_fan_in:2") == ("normal_fan_in", 2.0)
    assert parse_init("orthogonal:1.5") == ("orthogonal", 1.5)


@pytest.mark.parametrize("spec, needle", [
    ("normal_fan_in", "normal_fan_in needs a parameter, e.g. normal_fan_in:1.5"),
    ("normal_fan_in:", "needs a positive number"),
    ("normal_fan_in:0", "needs a positive number"),
    ("normal_fan_in:-2", "needs a positive number"),
    ("normal_fan_in:abc", "needs a positive number"),
    ("normal_fan_in:nan", "needs a positive number"),
    ("normal_fan_in:inf", "needs a positive number"),
    ("orthogonal:0", "orthogonal:X needs a positive number X, e.g. orthogonal:1.2"),
    ("orthogonal:-1", "needs a positive number"),
    ("orthogonal:x", "needs a positive number"),
    ("normal_fan_out:1", "one of default"),
])
def test_bad_specs_are_one_line_errors(spec, needle):
    with pytest.raises(ConfigError) as e:
        make_config(init=spec)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert f"init={spec!r}" in str(e.value)


def test_normal_fan_in_is_no_bias_init():
    with pytest.raises(ConfigError, match="bias_init='normal_fan_in:1'.*one of default, zeros"):
        make_config(bias_init="normal_fan_in:1")


@pytest.mark.parametrize("command, plural", [("train", ""), ("sweep", "s")])
def test_cli_takes_and_checks_the_new_inits(command, plural, fake_mnist, tmp_path):
    run = ["--depth" + plural, 3, "--width", 8, "--epochs", 1, "--data-dir", fake_mnist,
           *(["--quiet"] if command == "train" else ["--jobs", 1, "--train-sizes", 256,
                                                       "--activations", "tanh"])]
    bad = helpers.invoke(command, "--init" + plural, "normal_fan_in:-1", *run, "--out",
                         tmp_path / "bad")
    assert bad.exit_code == 2 and "normal_fan_in:X needs a positive number" in bad.output
    assert "Traceback" not in bad.output
    good = helpers.invoke(command, "--init" + plural, "normal_fan_in:1.5",
                          "--bias-init" + plural, "normal:0.2", *run, "--out", tmp_path / "good")
    assert good.exit_code == 0, good.output
    configs = list((tmp_path / "good" / "runs").glob("*/config.json"))
    assert configs and all('"init": "normal_fan_in:1.5"' in c.read_text() for c in configs)
