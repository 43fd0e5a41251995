import pytest
import torch
from torch import nn

from gradlab.config import ACTIVATIONS as ACT_NAMES
from gradlab.models import ACTIVATIONS, build_mlp, linear_layers

INITS = ["default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
         "lecun_normal", "orthogonal", "normal:0.5", "uniform:0.1", "orthogonal:1.5",
         "normal_fan_in:1.5"]


@pytest.mark.parametrize("sizes", [(784, 10), (784, 128, 256, 10), (784,) + (32,) * 9 + (10,)])
def test_layer_shapes(sizes):
    model = build_mlp(sizes, "relu")
    linears = linear_layers(model)
    assert len(linears) == len(sizes) - 1
    assert [(m.in_features, m.out_features) for m in linears] == list(
        zip(sizes, sizes[1:]))
    assert [n for n, _ in model.named_children() if n.startswith("fc")] == [
        f"fc{i}" for i in range(len(sizes) - 1)]
    assert model(torch.zeros(2, 784)).shape == (2, 10)


def test_tutorial_network_is_exact():
    model = build_mlp((784, 128, 256, 10), "sigmoid")
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.Sigmoid, nn.Linear, nn.Sigmoid, nn.Linear]


@pytest.mark.parametrize("activation", ACT_NAMES)
@pytest.mark.parametrize("init", INITS)
def test_every_activation_and_init_builds(activation, init):
    torch.manual_seed(0)
    model = build_mlp((784, 32, 16, 10), activation, init, "zeros")
    out = model(torch.rand(4, 784))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all((m.bias == 0).all() for m in linear_layers(model))


def test_init_statistics():
    torch.manual_seed(0)
    w = linear_layers(build_mlp((1000, 1000, 10), "relu", "normal:0.5"))[0].weight
    assert abs(w.std().item() - 0.5) < 0.01
    w = linear_layers(build_mlp((1000, 1000, 10), "relu", "kaiming_normal"))[0].weight
    assert abs(w.std().item() - (2 / 1000) ** 0.5) < 0.002
    w = linear_layers(build_mlp((1000, 1000, 10), "relu", "uniform:0.1"))[0].weight
    assert w.abs().max().item() <= 0.1
    w = linear_layers(build_mlp((64, 64, 10), "tanh", "orthogonal"))[0].weight
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)


@pytest.mark.parametrize("name", ACT_NAMES)
def test_closed_form_derivative_matches_autograd(name):
    act = ACTIVATIONS[name]
    z = torch.linspace(-6, 6, 1001, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(act.module()(z).sum(), z)
    assert torch.allclose(act.derivative(z.detach()), grad, atol=1e-6)
    assert grad.max().item() <= act.max_derivative + 1e-3
