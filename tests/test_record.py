"""The recorder against an independent computation: autograd on an explicit forward pass."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from gradlab.config import ACTIVATIONS as ACT_NAMES
from gradlab.models import ACTIVATIONS, build_mlp, linear_layers
from gradlab.record import COLUMNS, SATURATION, GradientRecorder, recorded_steps


def reference(model, activation, x, y):
    """Per-layer statistics computed without hooks: explicit forward, torch.autograd.grad."""
    act = ACTIVATIONS[activation]
    linears = linear_layers(model)
    zs, a = [], x
    for i, m in enumerate(linears):
        z = F.linear(a, m.weight, m.bias)
        zs.append(z)
        a = act.module()(z) if i < len(linears) - 1 else z
    loss = F.cross_entropy(a, y)
    params = [m.weight for m in linears] + [m.bias for m in linears]
    grads = torch.autograd.grad(loss, zs + params)
    n = len(linears)
    rows = []
    for i in range(n):
        row = {
            "grad_output_norm": grads[i].norm().item(),
            "grad_weight_norm": grads[n + i].norm().item(),
            "grad_bias_norm": grads[2 * n + i].norm().item(),
            "weight_norm": linears[i].weight.norm().item(),
            "loss": loss.item(),
            "act_grad_mean": np.nan, "saturated_frac": np.nan, "dead_frac": np.nan,
        }
        if i < n - 1:
            z = zs[i].detach().requires_grad_()
            (fp,) = torch.autograd.grad(act.module()(z).sum(), z)
            row["act_grad_mean"] = fp.mean().item()
            if act.saturating:
                row["saturated_frac"] = (fp < SATURATION * act.max_derivative).float().mean().item()
            if act.relu_family:
                row["dead_frac"] = (z.detach() <= 0).all(0).float().mean().item()
        rows.append(row)
    return rows


def make_inplace(model):
    for _name, child in model.named_children():
        if hasattr(child, "inplace"):
            child.inplace = True
    return model


@pytest.mark.parametrize("activation", ACT_NAMES)
@pytest.mark.parametrize("depth", [1, 2, 4, 7])
def test_recorded_values_match_autograd(activation, depth):
    torch.manual_seed(depth)
    sizes = (784,) + tuple(int(w) for w in torch.randint(5, 40, (depth - 1,))) + (10,)
    model = build_mlp(sizes, activation, "xavier_normal" if depth > 4 else "default")
    x, y = torch.rand(33, 784), torch.randint(0, 10, (33,))
    expected = reference(model, activation, x, y)
    weights_before = [m.weight.detach().clone() for m in linear_layers(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with GradientRecorder(model, activation, recorded_steps(1)) as rec:
        assert rec.begin_step(0)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        rec.after_backward(loss)
        # the recorded .grad is what the optimizer uses
        opt.step()
        rec.after_update()
        frame = rec.flush(epoch=1)
    assert list(frame.columns) == ["step", "epoch", "layer", "layer_name", *COLUMNS]
    assert len(frame) == depth and (frame["step"] == 0).all()
    for layer, row in enumerate(expected):
        got = frame.iloc[layer]
        for column, value in row.items():
            if np.isnan(value):
                assert np.isnan(got[column]), (column, layer)
            else:
                assert got[column] == pytest.approx(value, rel=1e-5, abs=1e-7), (column, layer)
        after = linear_layers(model)[layer].weight.detach()
        ratio = (after - weights_before[layer]).norm() / weights_before[layer].norm()
        assert got["update_ratio"] == pytest.approx(ratio.item(), rel=1e-4)


@pytest.mark.parametrize("activation", ["relu", "elu", "leaky_relu"])
def test_inplace_activations_and_input_without_grad(activation):
    torch.manual_seed(1)
    model = build_mlp((784, 20, 30, 10), activation)
    x, y = torch.rand(16, 784), torch.randint(0, 10, (16,))
    expected = reference(model, activation, x, y)
    make_inplace(model)
    with GradientRecorder(model, activation, np.array([0])) as rec:
        rec.begin_step(0)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.after_backward(loss)
        frame = rec.flush()
    for layer, row in enumerate(expected):
        assert frame.iloc[layer]["grad_output_norm"] == pytest.approx(row["grad_output_norm"],
                                                                     rel=1e-5)
        if layer < 2:
            assert frame.iloc[layer]["act_grad_mean"] == pytest.approx(row["act_grad_mean"])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_a_backward_pass_that_creates_a_graph_is_recorded_the_same():
    """A gradient penalty's ``backward(create_graph=True)``: gradients that require grad."""
    torch.manual_seed(3)
    model = build_mlp((784, 12, 10), "tanh")
    x, y = torch.rand(8, 784), torch.randint(0, 10, (8,))
    frames = []
    for create_graph in (False, True):
        twin = copy.deepcopy(model)
        opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
        with GradientRecorder(twin, "tanh", 1, optimizer=opt, applied_updates=True) as rec:
            rec.begin_step(0)
            loss = F.cross_entropy(twin(x), y)
            loss.backward(create_graph=create_graph)
            assert all(p.grad.requires_grad == create_graph for p in twin.parameters())
            rec.after_backward(loss)
            opt.step()
            rec.after_update()
            frames.append(rec.flush())
        for p in twin.parameters():
            p.grad = None  # (a graph made by create_graph refers back to the parameters)
    assert frames[0][list(COLUMNS)].notna().sum().sum() > 0
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_hooks_removed_on_exit_and_unrecorded_steps_cost_nothing():
    model = build_mlp((784, 8, 10), "sigmoid")
    with GradientRecorder(model, "sigmoid", np.array([1])) as rec:
        assert all(len(m._forward_hooks) == 1 for m in linear_layers(model))
        assert not rec.begin_step(0)
        out = model(torch.rand(2, 784))
        assert out.grad_fn is not None and not out._backward_hooks
        assert len(rec.flush()) == 0
    assert all(len(m._forward_hooks) == 0 for m in linear_layers(model))


def test_buffers_grow_past_initial_size():
    model = build_mlp((784, 8, 10), "tanh")
    x, y = torch.rand(4, 784), torch.randint(0, 10, (4,))
    with GradientRecorder(model, "tanh", recorded_steps(100, 3)) as rec:
        for step in range(100):
            if rec.begin_step(step):
                loss = F.cross_entropy(model(x), y)
                model.zero_grad()
                loss.backward()
                rec.after_backward(loss)
                rec.after_update()
        frame = rec.flush()
    assert sorted(frame["step"].unique()) == list(range(0, 100, 3))
    assert frame["grad_weight_norm"].notna().all()


def test_schedules():
    assert list(recorded_steps(10, 1)) == list(range(10))
    assert list(recorded_steps(10, 4)) == [0, 4, 8]
    assert len(recorded_steps(10, 0)) == 0
    log = recorded_steps(100_000, 1, log_spaced=True)
    assert log[0] == 0 and log[-1] < 100_000 and 80 < len(log) <= 101
    assert np.all(np.diff(log) > 0)


@pytest.mark.parametrize("settings", [
    {"maximize": True, "weight_decay": 0.1},
    {"maximize": True, "weight_decay": 0.1, "momentum": 0.9, "dampening": 0.3},
    {"maximize": True, "weight_decay": 0.1, "momentum": 0.9, "nesterov": True},
    {"maximize": False, "weight_decay": 0.1, "momentum": 0.9, "dampening": 0.5},
], ids=["maximize-wd", "maximize-wd-dampening", "maximize-wd-nesterov", "wd-dampening"])
def test_sgd_update_ratio_equals_a_weight_snapshot(settings):
    """update_ratio read from SGD's own direction equals ‖W_after − W_before‖/‖W_before‖ taken
    from a snapshot of the weights around each step (float64: no rounding between them)."""
    torch.manual_seed(0)
    model = build_mlp((784, 16, 12, 10), "tanh").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **settings)
    g = torch.Generator().manual_seed(3)
    expected = []
    with GradientRecorder(model, "tanh", 1, optimizer=opt) as rec:
        for step in range(4):
            x = torch.rand(8, 784, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (8,), generator=g)
            rec.begin_step(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.after_backward(loss)
            before = [m.weight.detach().clone() for m in linear_layers(model)]
            opt.step()
            rec.after_update()
            expected += [((m.weight.detach() - w).norm() / w.norm()).item()
                         for m, w in zip(linear_layers(model), before)]
        frame = rec.flush()
    np.testing.assert_allclose(frame["update_ratio"], expected, rtol=1e-9)
