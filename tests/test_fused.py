"""The numba kernels of ``gradlab.engines.fused`` against the eager PyTorch steps they replace."""

import math

import numpy as np
import pytest
import torch

from gradlab.engines import fused
from gradlab.engines.stacked import StackedMLP
from gradlab.models import build_mlp

SIZES = (784, 37, 29, 10)


def assert_records_close(got, want, rtol, atol):
    """Two grads frames: the same steps and layers, every float column within tolerance."""
    assert got[["step", "layer"]].equals(want[["step", "layer"]])
    for column in ("loss", "grad_output_norm", "grad_weight_norm", "grad_bias_norm",
                   "weight_norm", "update_ratio", "act_grad_mean"):
        np.testing.assert_allclose(got[column], want[column], rtol=rtol, atol=atol,
                                   err_msg=column)


def engine_pair(activation, variants, sizes=SIZES, seeds=(0, 1), batch_size=48, lr=0.3,
                **options):
    """One engine per dict of ``variants`` (options of each), all from the same initial weights
    (one member per seed)."""
    pair = []
    for variant in variants:
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(build_mlp(sizes, activation))
        pair.append(StackedMLP(models, activation, batch_size=batch_size, lr=lr, max_rows=64,
                               **variant, **options))
    return pair


def engines(activation, seeds=(0, 1), **options):
    """Two engines from the same initial weights: fused kernels and eager PyTorch only."""
    return engine_pair(activation, [dict(fused=True), dict(fused=False)], seeds=seeds, **options)


def batches(count, members, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.rand(members, 48, 784, generator=g), torch.randint(0, 10, (members, 48),
                                                                         generator=g)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"])
def test_fused_steps_equal_the_eager_steps(activation):
    fast, eager = engines(activation)
    assert fast.optimizer.fused_sgd and not eager.optimizer.fused_sgd
    assert fast.records.fused_stats == (activation != "gelu")
    steps = []
    for step, (x, y) in enumerate(batches(40, 2)):
        record = step % 3 != 1
        if record:
            steps.append(step)
        for engine in (fast, eager):
            losses, _ = engine.step(x, y, record)
            engine.last_losses = losses
        # the loss kernel rounds differently from log_softmax; the update is bitwise eager
        # SGD's (test_sgd_step_norms_matches_float64_sums_across_tiles): the weights differ
        # by rounding only
        torch.testing.assert_close(fast.last_losses, eager.last_losses, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast.params, eager.params, rtol=1e-5, atol=1e-7)
    for got, want in zip(fast.flush(steps, 1), eager.flush(steps, 1), strict=True):
        assert_records_close(got, want, rtol=2e-5, atol=1e-9)
        # a count may differ only where f' rounds across the threshold: one unit of 48 * 37
        np.testing.assert_allclose(got["saturated_frac"], want["saturated_frac"], atol=1e-3)
        np.testing.assert_array_equal(got["dead_frac"], want["dead_frac"])


def test_recording_does_not_change_the_fused_engine():
    on, _ = engines("sigmoid")
    off, _ = engines("sigmoid")
    for step, (x, y) in enumerate(batches(25, 2, seed=3)):
        a, _ = on.step(x, y, record=True)
        b, _ = off.step(x, y, record=False)
        assert torch.equal(a, b), step
    assert torch.equal(on.params, off.params)
    assert len(on.flush(list(range(25)), 1)[0]) == 25 * len(SIZES[1:])


def test_clipping_and_momentum_take_the_eager_update():
    for options in (dict(clip_grad_norm=0.1), dict(momentum=0.9), dict(weight_decay=0.01)):
        fast, _ = engines("sigmoid", **options)
        assert not fast.optimizer.fused_sgd, options


def test_sgd_step_norms_keeps_inf_and_nan_and_skips_unlisted_elements():
    params = np.arange(1, 9, dtype=np.float32)
    grads = np.array([1, 2, np.inf, 0, 1, np.nan, 1, 1], dtype=np.float32)
    blocks = np.array([[0, 2, 0, 1], [2, 4, -1, 2], [4, 6, 3, 4]], dtype=np.int64)
    deltas = np.array([3, 4, 0, 0], dtype=np.float32)
    out = np.full(6, -1, dtype=np.float64)
    fused.sgd_step_norms(params, grads, np.float32(-0.5), blocks, deltas,
                         np.array([[0, 2, 5]], dtype=np.int64), out)
    np.testing.assert_array_equal(out[[0, 1, 5]], [1 + 4, 1 + 4, 25])
    assert math.isinf(out[2]) and out[3] == 25 + 36 and math.isnan(out[4])
    np.testing.assert_array_equal(params[[0, 1, 4]], [0.5, 1.0, 4.5])
    assert params[6] == 7 and params[7] == 8  # outside every block


def test_without_numba_the_engine_falls_back_to_eager(monkeypatch):
    import sys

    import gradlab.engines

    monkeypatch.setitem(sys.modules, "gradlab.engines.fused", None)  # import raises ImportError
    monkeypatch.delattr(gradlab.engines, "fused")
    with pytest.warns(UserWarning, match=r"eager PyTorch path.*pip install 'gradlab\[fast\]'"):
        fast, eager = engines("sigmoid")
    assert fast.kernels is None and not fast.optimizer.fused_sgd
    for x, y in batches(3, 2):
        assert torch.equal(fast.step(x, y, True)[0], eager.step(x, y, True)[0])


@pytest.mark.parametrize("activation", ["sigmoid", "gelu"])
def test_engine_runs_off_the_cpu_without_numpy(activation):
    """The ``meta`` device stands in for CUDA here: no numpy views, no numba, eager ops only."""
    models = [build_mlp((784, 16, 12, 10), activation).to("meta") for _ in range(2)]
    engine = StackedMLP(models, activation, batch_size=8, lr=0.1, max_rows=4)
    assert engine.kernels is None and not engine.optimizer.fused_sgd
    x = torch.empty(2, 8, 784, device="meta")
    y = torch.empty(2, 8, dtype=torch.int64, device="meta")
    for record in (True, False, True):
        losses, logits = engine.step(x, y, record)
    engine.records.process_chunk(engine._views)  # the f' statistics of the chunk
    assert losses.shape == (2,) and logits.shape == (2, 8, 10)


@pytest.mark.parametrize("sizes", [(1,), (2047, 2048, 2049), (5000, 3, 4097)])
def test_sgd_step_norms_matches_float64_sums_across_tiles(sizes):
    g = np.random.default_rng(len(sizes))
    starts = np.cumsum([0, *[s + 7 for s in sizes]])  # gaps between blocks stay untouched
    params = g.standard_normal(starts[-1]).astype(np.float32)
    grads = g.standard_normal(starts[-1]).astype(np.float32)
    blocks = np.array([(a, a + s, 2 * k, 2 * k + 1) for k, (a, s) in
                       enumerate(zip(starts, sizes, strict=False))], dtype=np.int64)
    before, out = params.copy(), np.zeros(2 * len(sizes), np.float64)
    fused.sgd_step_norms(params, grads, np.float32(-0.1), blocks, np.zeros(1, np.float32),
                         np.zeros((0, 3), np.int64), out)
    expected = torch.from_numpy(before.copy()).add_(torch.from_numpy(grads), alpha=-0.1).numpy()
    for k, (a, s) in enumerate(zip(starts, sizes, strict=False)):
        w, d = before[a:a + s].astype(np.float64), grads[a:a + s].astype(np.float64)
        assert out[2 * k] == pytest.approx((w * w).sum(), rel=1e-5)
        assert out[2 * k + 1] == pytest.approx((d * d).sum(), rel=1e-5)
        np.testing.assert_array_equal(params[a:a + s], expected[a:a + s])
        np.testing.assert_array_equal(params[a + s:a + s + 7], before[a + s:a + s + 7])


@pytest.mark.parametrize("activation", sorted(fused.CODES))
def test_activation_stats_kernel_matches_the_torch_statistics(activation):
    from gradlab.activations import SATURATION
    from gradlab.models import ACTIVATIONS
    from gradlab.record import activation_stats as reference
    from gradlab.record import derivative_into, hidden_segments

    rows, members, batch, widths = 3, 2, 5, (4, 7)
    units = sum(widths)
    z = torch.randn(rows, members, batch, units, generator=torch.Generator().manual_seed(1)) * 3
    z[0, 1, :, 2] = -1.0  # a unit that is off for the whole batch: dead in the relu family
    a = ACTIVATIONS[activation].module()(z)
    want = reference(a, derivative_into(activation, True), ACTIVATIONS[activation],
                     hidden_segments(widths), torch.empty_like(a))  # (rows, members, layers, 3)
    got = np.full((rows + 1, members, 3, 3), np.nan, np.float32)
    step = fused.step_spec(members, batch, code=fused.CODES[activation], slope=0.01,
                           threshold=SATURATION * ACTIVATIONS[activation].max_derivative)
    fused.activation_stats(a.numpy().reshape(-1), members * batch * units, rows,
                           np.array([0, 4, 11]), step, got, 1)
    assert np.isnan(got[0]).all()  # rows before first_row are left alone
    np.testing.assert_allclose(got[1:, :, :2, 0], want[..., 0].numpy(), rtol=1e-5)
    info = ACTIVATIONS[activation]
    if info.saturating:
        np.testing.assert_array_equal(got[1:, :, :2, 1], want[..., 1].numpy())
    if info.relu_family:
        np.testing.assert_array_equal(got[1:, :, :2, 2], want[..., 2].numpy())
        assert got[1, 1, 0, 2] >= 1


def test_cross_entropy_equals_torch():
    g = torch.Generator().manual_seed(0)
    members, batch, classes = 3, 17, 10
    logits = torch.randn(members, batch, classes, generator=g) * 4
    logits[2, 5, 3] = math.nan  # member 2 diverged: its loss must be nan, the others not
    y = torch.randint(0, classes, (members, batch), generator=g)
    losses = np.zeros(members, np.float32)
    deltas = np.full(members * batch * classes + 8, 9.0, np.float32)
    at = np.array([8 + m * batch * classes for m in range(members)], dtype=np.int64)
    fused.cross_entropy(logits.reshape(-1).numpy(), y.reshape(-1).numpy(), losses, deltas, at,
                        fused.step_spec(members, batch, classes=classes))
    want_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    want = torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, classes)
    np.testing.assert_allclose(losses[:2], want_loss.mean(1)[:2], rtol=1e-6)
    assert math.isnan(losses[2])
    got = torch.from_numpy(deltas[8:]).view(members, batch, classes)
    torch.testing.assert_close(got[:2], want[:2] / batch, rtol=1e-5, atol=1e-7)
    assert (deltas[:8] == 9.0).all()


def test_head_equals_the_last_layers_torch_step():
    """``fused.head`` (last layer forward, loss, backward) against autograd, with two members,
    hidden rows strided as in the chunk buffer, and blocks at odd offsets."""
    g = torch.Generator().manual_seed(0)
    members, batch, width, classes, stride = 2, 9, 37, 10, 50
    hidden = torch.randn(members * batch * stride + 3, generator=g)
    h_at = np.array([3, 3 + batch * stride])
    params = torch.randn(1000, generator=g)
    w_at = np.array([5, 5 + classes * width + 20])
    b_at = w_at + classes * width
    y = torch.randint(0, classes, (members, batch), generator=g)
    logits = np.zeros(members * batch * classes, np.float32)
    losses = np.zeros(members, np.float32)
    deltas = np.zeros(members * batch * classes + 7, np.float32)
    d_at = np.array([7, 7 + batch * classes])
    grads = np.full(1000, 3.0, np.float32)
    dh = np.zeros(members * batch * width, np.float32)
    correct = np.array([5, 0])  # counts add up
    at = np.zeros(members, fused.HEAD_AT)
    at["weight"], at["bias"], at["delta"] = w_at, b_at, d_at
    step = fused.step_spec(members, batch, width=width, classes=classes, row_stride=stride,
                           slope=0.01)
    fused.head(hidden.numpy(), h_at, params.numpy(), grads, deltas, dh, y.reshape(-1).numpy(),
               logits, losses, correct, at, step)
    for m in range(members):
        h = hidden[h_at[m]:h_at[m] + batch * stride].view(batch, stride)[:, :width]
        h = h.clone().requires_grad_()
        w = params[w_at[m]:b_at[m]].view(classes, width).clone().requires_grad_()
        b = params[b_at[m]:b_at[m] + classes].clone().requires_grad_()
        z = h @ w.T + b
        z.retain_grad()
        loss = torch.nn.functional.cross_entropy(z, y[m])
        loss.backward()
        close = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(logits).view(members, batch, -1)[m],
                                   z.detach(), **close)
        assert abs(losses[m] - loss.item()) < 1e-5 * loss.item()
        assert correct[m] == 5 * (m == 0) + int((z.argmax(1) == y[m]).sum())
        torch.testing.assert_close(
            torch.from_numpy(deltas[d_at[m]:d_at[m] + batch * classes]).view(batch, -1),
            z.grad, **close)
        torch.testing.assert_close(torch.from_numpy(grads[w_at[m]:b_at[m]]).view(classes, -1),
                                   w.grad, **close)
        torch.testing.assert_close(torch.from_numpy(grads[b_at[m]:b_at[m] + classes]), b.grad,
                                   **close)
        torch.testing.assert_close(torch.from_numpy(dh).view(members, batch, -1)[m], h.grad,
                                   **close)
    assert grads[0] == 3.0 and grads[-1] == 3.0  # nothing outside the blocks


@pytest.mark.parametrize("activation", sorted(fused.CODES))
def test_head_takes_the_layer_belows_derivative_as_torch_does(activation):
    from gradlab.activations import LEAKY_SLOPE
    from gradlab.engines.act_kernels import ACTIVATIONS

    g = torch.Generator().manual_seed(1)
    batch, width, classes = 6, 21, 10
    z = torch.randn(batch, width, generator=g) * 3
    h = ACTIVATIONS[activation].module()(z)  # the layer below's output
    h.view(-1)[:3] = 0  # relu family: where the output is exactly 0
    params = torch.randn(classes * width + classes, generator=g).numpy()
    y = torch.randint(0, classes, (batch,), generator=g).numpy()
    out = {}
    for code in (-1, fused.CODES[activation]):
        deltas = np.zeros(batch * classes + batch * width, np.float32)
        dh = np.zeros(batch * width, np.float32)
        grads = np.full(len(params) + width, 7.0, np.float32)  # + the layer below's bias
        at = np.zeros(1, fused.HEAD_AT)
        at["bias"], at["below_delta"], at["below_bias"] = classes * width, batch * classes, len(
            params)
        step = fused.step_spec(1, batch, width=width, classes=classes, row_stride=width,
                               code=code, slope=LEAKY_SLOPE)
        fused.head(h.reshape(-1).numpy(), np.zeros(1, np.int64), params, grads, deltas, dh, y,
                   np.zeros(batch * classes, np.float32), np.zeros(1, np.float32),
                   np.zeros(1, np.int64), at, step)
        out[code] = (torch.from_numpy(deltas[batch * classes:]).view(batch, width), dh,
                     torch.from_numpy(grads[len(params):]))
    dh = torch.from_numpy(out[-1][1]).view(batch, width)
    want = ACTIVATIONS[activation].backward(dh, h, torch.empty_like(dh))
    torch.testing.assert_close(out[fused.CODES[activation]][0], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[fused.CODES[activation]][2], want.sum(0), rtol=1e-5,
                               atol=1e-6)
    assert not out[-1][0].any()  # code -1: the layer below is left to the caller
    assert (out[-1][2] == 7.0).all()
