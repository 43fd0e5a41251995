"""The stacked engine against independent computations: autograd on each member's own module,
torch.optim and clip_grad_norm_, and the hook recorder's records."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradlab.config import ACTIVATIONS as ACT_NAMES
from gradlab.engines.stacked import StackedMLP
from gradlab.models import build_mlp, linear_layers
from gradlab.record import COLUMNS, GradientRecorder
from tests.test_record import reference


def members(activation, sizes, seeds, init="default"):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(build_mlp(sizes, activation, init))
    return out


def clones(models, activation, sizes):
    copies = []
    for model in models:
        copy = build_mlp(sizes, activation)
        copy.load_state_dict(model.state_dict())
        copies.append(copy)
    return copies


def assert_frame_matches(frame, expected, rel=1e-5):
    for layer, row in enumerate(expected):
        got = frame.iloc[layer]
        for column, value in row.items():
            if np.isnan(value):
                assert np.isnan(got[column]), (column, layer)
            else:
                assert got[column] == pytest.approx(value, rel=rel, abs=1e-7), (column, layer)


@pytest.mark.parametrize("activation", ACT_NAMES)
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_gradients_and_records_match_autograd(activation, depth):
    torch.manual_seed(depth)
    sizes = (784,) + tuple(int(w) for w in torch.randint(5, 40, (depth - 1,))) + (10,)
    models = members(activation, sizes, [0, 1])
    before = [[m.weight.detach().clone() for m in linear_layers(model)] for model in models]
    x, y = torch.rand(2, 33, 784), torch.randint(0, 10, (2, 33))
    expected = [reference(model, activation, x[i], y[i]) for i, model in enumerate(models)]
    grads = []
    for i, model in enumerate(models):
        loss = F.cross_entropy(model(x[i]), y[i])
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    engine = StackedMLP(models, activation, batch_size=33, lr=0.5, max_rows=1)
    losses, _ = engine.step(x, y, record=True)
    frames = engine.flush([0], epoch=1)
    for i, model in enumerate(models):
        assert list(frames[i].columns) == ["step", "epoch", "layer", "layer_name", *COLUMNS]
        assert losses[i].item() == pytest.approx(expected[i][0]["loss"], rel=1e-6)
        for layer in range(depth):
            for k, stacked in enumerate((engine.gW[layer][i], engine.gb[layer][i])):
                torch.testing.assert_close(stacked, grads[i][2 * layer + k], rtol=1e-5,
                                           atol=1e-7)
        assert_frame_matches(frames[i], expected[i])
        for layer, lin in enumerate(linear_layers(model)):  # the module sees the update
            delta = (lin.weight.detach() - before[i][layer]).norm() / before[i][layer].norm()
            assert frames[i].iloc[layer]["update_ratio"] == pytest.approx(delta.item(), rel=1e-4)


@pytest.mark.parametrize("options", [
    dict(optimizer="sgd", momentum=0.9), dict(optimizer="sgd", weight_decay=0.01),
    dict(optimizer="sgd", momentum=0.5, weight_decay=0.1), dict(optimizer="adam", lr=0.01),
    dict(optimizer="sgd", clip_grad_norm=0.05), dict(optimizer="adam", lr=0.01,
                                                     clip_grad_norm=0.05),
])
def test_optimizers_and_clipping_match_torch(options):
    options = {"lr": 0.2, **options}
    models = members("tanh", (784, 20, 15, 10), [3, 4])
    twins = clones(models, "tanh", (784, 20, 15, 10))
    engine = StackedMLP(models, "tanh", batch_size=16, max_rows=4, **options)
    optimizers = []
    for twin in twins:
        if options["optimizer"] == "adam":
            optimizers.append(torch.optim.Adam(twin.parameters(), lr=options["lr"],
                                               weight_decay=options.get("weight_decay", 0)))
        else:
            optimizers.append(torch.optim.SGD(twin.parameters(), lr=options["lr"],
                                              momentum=options.get("momentum", 0),
                                              weight_decay=options.get("weight_decay", 0)))
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.rand(2, 16, 784, generator=g), torch.randint(0, 10, (2, 16), generator=g)
        before = [[m.weight.detach().clone() for m in linear_layers(t)] for t in twins]
        engine.step(x, y, record=True)
        for i, (twin, opt) in enumerate(zip(twins, optimizers, strict=True)):
            opt.zero_grad()
            F.cross_entropy(twin(x[i]), y[i]).backward()
            if "clip_grad_norm" in options:
                nn.utils.clip_grad_norm_(twin.parameters(), options["clip_grad_norm"])
            opt.step()
            # Adam divides by sqrt(v): where a gradient is ~0, float noise (here the loss
            # kernel's rounding against log_softmax's) moves it by up to a few lr*1e-3
            atol = 3e-5 if options["optimizer"] == "adam" else 1e-6
            for mine, theirs in zip(models[i].parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=atol)
        if step == 3:
            frames = engine.flush(list(range(4)), epoch=1)
            for i, twin in enumerate(twins):
                for layer, lin in enumerate(linear_layers(twin)):
                    delta = (lin.weight.detach() - before[i][layer]).norm()
                    ratio = (delta / before[i][layer].norm()).item()
                    got = frames[i][frames[i]["step"] == 3].iloc[layer]["update_ratio"]
                    assert got == pytest.approx(ratio, rel=1e-3)


def test_batch_size_changes_match_the_hook_recorder(monkeypatch):
    """Records of a run with a smaller batch now and then equal the hook recorder's (with
    several activation chunks) on the same module trained with torch.optim."""
    monkeypatch.setattr("gradlab.record.fprime.CHUNK_BYTES", 3 * 40 * (30 + 20) * 4)
    activation = "sigmoid"
    (model,) = members(activation, (784, 30, 20, 10), [5])
    (twin,) = clones([model], activation, (784, 30, 20, 10))
    engine = StackedMLP([model], activation, batch_size=40, lr=0.3, max_rows=10)
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(1)
    batches = [40, 40, 40, 40, 40, 40, 40, 13, 40, 13]
    with GradientRecorder(twin, activation, np.arange(len(batches)), optimizer=opt) as rec:
        for step, batch in enumerate(batches):
            x, y = torch.rand(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
            engine.step(x[None], y[None], record=True)
            rec.begin_step(step)
            loss = F.cross_entropy(twin(x), y)
            opt.zero_grad()
            loss.backward()
            rec.after_backward(loss)
            opt.step()
            rec.after_update()
        theirs = rec.flush(epoch=1)
    (mine,) = engine.flush(list(range(len(batches))), epoch=1)
    assert len(mine) == len(theirs) == 3 * len(batches)
    for column in COLUMNS:
        np.testing.assert_allclose(mine[column], theirs[column], rtol=1e-4, atol=1e-8,
                                   err_msg=column)


def test_flush_checks_the_step_count():
    (model,) = members("relu", (784, 8, 10), [0])
    engine = StackedMLP([model], "relu", batch_size=4, max_rows=1)
    engine.step(torch.rand(1, 4, 784), torch.randint(0, 10, (1, 4)), record=True)
    with pytest.raises(ValueError):
        engine.flush([0, 1], epoch=1)
    with pytest.raises(RuntimeError):
        engine.step(torch.rand(1, 4, 784), torch.randint(0, 10, (1, 4)), record=True)


def test_block_norms_paths_agree_and_keep_nonfinite_blocks_apart():
    """The numba path (a CPU with the kernels), the segment_reduce path and the index_add_ path
    (devices without segment_reduce) give the same float64 squared norms, and an inf in one
    member's block leaves the others' norms finite."""
    models = members("relu", (784, 12, 10), [0, 1])
    engine = StackedMLP(models, "relu", batch_size=8, max_rows=2)
    x, y = torch.rand(2, 8, 784), torch.randint(0, 10, (2, 8))
    engine.step(x, y, record=True)
    views = engine._batch_views(8)
    norms, flat = views.norms, engine.buffer.flat
    assert norms.kernels is not None
    fast = torch.empty(norms.order.shape[0], dtype=torch.float64)
    norms(flat, fast)
    norms.kernels = None
    reduced = torch.empty_like(fast)
    norms(flat, reduced)
    norms.ids = torch.repeat_interleave(torch.arange(norms.count), norms.lengths)
    added = torch.empty_like(fast)
    norms(flat, added)
    torch.testing.assert_close(fast, reduced, rtol=1e-6, atol=0)  # float32 sums per tile
    torch.testing.assert_close(reduced, added, rtol=1e-12, atol=0)
    engine.W[0][1, 0, 0] = float("inf")
    norms(flat, added)
    per_member = added.view(2, -1)
    assert torch.isfinite(per_member[0]).all() and not torch.isfinite(per_member[1]).all()


def deep_sigmoid(seed=0):
    """Depth 32, width 16, sigmoid: the early layers' gradients are so small (~1e-23 and less)
    that their float32 squares underflow."""
    torch.manual_seed(seed)
    return build_mlp((784,) + (16,) * 31 + (10,), "sigmoid")


def float64_norms(tensors):
    return np.array([np.linalg.norm(t.detach().double().reshape(-1).numpy()) for t in tensors])


@pytest.mark.parametrize("options", [dict(), dict(density=0.2), dict(fused=False),
                                     dict(clip_grad_norm=1e-30)])
def test_norms_exact_where_float32_squares_underflow(options):
    """Step 0's grad_weight/bias/output norms equal the float64 norms of the engine's own
    float32 gradients to ~1e-6, including layers whose float32 squares underflow (a float32
    norm reads 0 or is far off there); they agree with autograd in float64 to float32
    backward rounding; and update_ratio is lr * ||clipped g|| / ||W|| however small."""
    options = dict(options)
    density = options.pop("density", 1.0)
    model = deep_sigmoid()
    twin = build_mlp((784,) + (16,) * 31 + (10,), "sigmoid").double()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 256, 784, generator=g)
    x *= torch.rand(x.shape, generator=g) < density  # mostly zeros: the sparse first layer
    y = torch.randint(0, 10, (1, 256), generator=g)
    engine = StackedMLP([model], "sigmoid", batch_size=256, lr=0.1, max_rows=1,
                        input_density=density, **options)
    assert engine.sparse == (density < 1)
    weights = [w[0].clone() for w in engine.W]
    engine.step(x, y, record=True)
    (frame,) = engine.flush([0], epoch=1)
    deltas = [d[0] for d in engine._batch_views(256).deltas.views]
    clip = "clip_grad_norm" in options
    mine = {"grad_output_norm": deltas}
    if not clip:  # clipped, the gradients left in the engine are no longer those recorded
        mine.update(grad_weight_norm=[w[0] for w in engine.gW],
                    grad_bias_norm=[b[0] for b in engine.gb])
    underflows = 0
    for column, tensors in mine.items():
        want = float64_norms(tensors)
        np.testing.assert_allclose(frame[column], want, rtol=2e-6, err_msg=column)
        naive = np.array([torch.linalg.vector_norm(t.float()).item() for t in tensors])
        underflows += int((np.abs(naive / want - 1) > 1e-2).sum())
    assert underflows >= 3, "the test must reach norms whose float32 squares underflow"
    # the same gradients from autograd in float64 (float32 rounding accumulates over depth)
    zs = []

    def keep(module, inputs, z):
        z.retain_grad()
        zs.append(z)

    hooks = [lin.register_forward_hook(keep) for lin in linear_layers(twin)]
    F.cross_entropy(twin(x[0].double()), y[0]).backward()
    for hook in hooks:
        hook.remove()
    linears = linear_layers(twin)
    np.testing.assert_allclose(frame["grad_output_norm"], float64_norms([z.grad for z in zs]),
                               rtol=1e-3)
    np.testing.assert_allclose(frame["grad_weight_norm"],
                               float64_norms([lin.weight.grad for lin in linears]), rtol=1e-3)
    np.testing.assert_allclose(frame["grad_bias_norm"],
                               float64_norms([lin.bias.grad for lin in linears]), rtol=1e-3)
    # update_ratio: the intended update lr * ||clipped g|| over ||W||, however small
    grad = frame["grad_weight_norm"].to_numpy()
    if clip:  # clip_grad_norm_'s factor, from the recorded (float64) norms
        total = np.sqrt((grad ** 2).sum() + (frame["grad_bias_norm"].to_numpy() ** 2).sum())
        grad = grad * 1e-30 / (total + 1e-6)
    want = 0.1 * grad / float64_norms(weights)
    assert (want > 0).all()
    np.testing.assert_allclose(frame["update_ratio"], want, rtol=1e-5)
