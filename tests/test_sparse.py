"""The sparse first layer (``gradlab.engines.sparse``) against dense products and the dense
engine."""

import dataclasses

import numpy as np
import pytest
import torch

from gradlab.config import make_config
from gradlab.data import Data, Split
from gradlab.engines import sparse
from gradlab.engines.batches import nonzero_fraction
from gradlab.engines.stacked import StackedMLP
from gradlab.models import build_mlp, linear_layers
from gradlab.train import train
from tests.test_fused import assert_records_close, engine_pair


def sparse_rows(rows, features, seed=0, density=0.2):
    """Rows in [0, 1] with about ``density`` of them nonzero, in runs as pen strokes are."""
    rng = np.random.default_rng(seed)
    x = rng.random((rows, features), dtype=np.float32)
    keep = rng.random((rows, features)) < density
    keep[:, 1:] |= keep[:, :-1] & (rng.random((rows, features - 1)) < 0.5)
    return np.where(keep, x, np.float32(0))


@pytest.mark.parametrize("features", [37, 784])
def test_nonzeros_lists_each_pair_of_rows_in_feature_order(features):
    x = sparse_rows(9, features)
    x[3] = 0  # a row with none
    x[4, -1] = np.nan  # nan counts as nonzero: it must reach the products
    x[2, :] = 0  # so pair (2, 3) has none
    starts = np.array([0, 5, 9])  # two segments: pairs (0, 1), (2, 3), (4,) and (5, 6), (7, 8)
    small = sparse.buffers(9, features, 0.01, 2)
    assert sparse.nonzeros(x.reshape(-1), starts, features, small["pair_start"], small["keys"],
                           small["first"], small["second"]) == -1  # too small: said, not overrun
    buf = sparse.list_nonzeros(x.reshape(-1), features, small, starts, columns=False)
    assert len(buf["keys"]) == 9 * features  # grown
    for k, (a, b) in enumerate([(0, 1), (2, 3), (4, None), (5, 6), (7, 8)]):
        lo, hi = buf["pair_start"][k], buf["pair_start"][k + 1]
        second = x[b] if b is not None else np.zeros(features, np.float32)
        want = np.flatnonzero((x[a] != 0) | (second != 0))
        np.testing.assert_array_equal(buf["keys"][lo:hi], want)
        np.testing.assert_array_equal(buf["first"][lo:hi], x[a, want])
        np.testing.assert_array_equal(buf["second"][lo:hi], second[want])
        assert (k == 1) == (lo == hi)


def test_nonzeros_by_column_within_each_segment():
    features, sizes = 41, [5, 0, 7, 3]  # segments of rows, one empty
    starts = np.cumsum([0] + sizes)
    x = sparse_rows(starts[-1], features, seed=3)
    x[1] = 0
    x[8, 0] = np.nan
    buf = sparse.list_nonzeros(x.reshape(-1), features,
                               sparse.buffers(starts[-1], features, 0.3, 1), starts)
    assert len(buf["column_start"]) >= len(sizes) * features + 1  # grown
    for g, (a, b) in enumerate(zip(starts, starts[1:])):
        for p in range(features):
            c = g * features + p
            lo, hi = buf["column_start"][c], buf["column_start"][c + 1]
            want = np.flatnonzero(x[a:b, p] != 0)
            np.testing.assert_array_equal(buf["column_rows"][lo:hi], want)
            np.testing.assert_array_equal(buf["column_values"][lo:hi], x[a + want, p])
    assert buf["column_start"][len(sizes) * features] == np.count_nonzero(x)


@pytest.mark.parametrize("width", [5, 16, 128, 200, 300])
def test_products_equal_the_dense_products(width):
    members, batch, features = 2, 7, 53
    rng = np.random.default_rng(width)
    x = sparse_rows(members * batch, features, seed=width)
    # parameters of two members, each W^T (features, width) then b, at odd offsets
    w_at = np.array([3, 3 + features * width + width + 11], dtype=np.int64)
    b_at = w_at + features * width
    params = rng.standard_normal(int(b_at[-1]) + width + 5).astype(np.float32)
    buf = sparse.list_nonzeros(x.reshape(-1), features,
                               sparse.buffers(members * batch, features, 0.3, members),
                               np.arange(0, members * batch + 1, batch))
    # z written with a row stride wider than width, into a buffer of sentinels
    stride = width + 9
    z_at = np.array([0, batch * stride], dtype=np.int64)
    z = np.full(members * batch * stride, 7.0, dtype=np.float32)
    sparse.forward(buf["pair_start"], buf["keys"], buf["first"], buf["second"], 0, members,
                   batch, params, w_at,
                   b_at, width, z, z_at, stride)
    deltas = rng.standard_normal(members * batch * width + 4).astype(np.float32)
    d_at = np.array([4, 4 + batch * width], dtype=np.int64)
    grads = np.full_like(params, 5.0)
    sparse.weight_grad(buf["column_start"], buf["column_rows"], buf["column_values"], members,
                       batch, features, deltas, d_at, width, grads, w_at, b_at)
    x64 = x.astype(np.float64).reshape(members, batch, features)
    z = z.reshape(members, batch, stride)
    for m in range(members):
        wt = params[w_at[m]:b_at[m]].reshape(features, width).astype(np.float64)
        bias = params[b_at[m]:b_at[m] + width]
        np.testing.assert_allclose(z[m, :, :width], x64[m] @ wt + bias, rtol=1e-5, atol=1e-5)
        d = deltas[d_at[m]:d_at[m] + batch * width].reshape(batch, width).astype(np.float64)
        np.testing.assert_allclose(grads[w_at[m]:b_at[m]].reshape(features, width),
                                   x64[m].T @ d, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[b_at[m]:b_at[m] + width], d.sum(0), rtol=1e-5,
                                   atol=1e-5)
    assert (z[:, :, width:] == 7.0).all()  # nothing written past the rows
    outside = np.ones(len(grads), bool)
    for m in range(members):
        outside[w_at[m]:b_at[m] + width] = False
    assert (grads[outside] == 5.0).all()


def engines(activation, sizes=(64, 21, 18, 10)):
    """The fused engine with the sparse first layer and without it, from the same weights."""
    return engine_pair(activation, [dict(input_density=0.2), dict(input_density=1.0)],
                       sizes=sizes, batch_size=24, lr=0.1)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "gelu"])
@pytest.mark.parametrize("sizes", [(64, 21, 18, 10), (64, 10)])
def test_sparse_engine_equals_the_dense_engine(activation, sizes):
    fast, dense = engines(activation, sizes)
    assert fast._sparse is sparse and dense._sparse is None
    g = torch.Generator().manual_seed(1)
    steps = []
    for step in range(30):
        x = torch.from_numpy(sparse_rows(2 * 24, sizes[0], seed=step)).view(2, 24, -1)
        y = torch.randint(0, 10, (2, 24), generator=g)
        if step % 4 != 3:
            steps.append(step)
        for engine in (fast, dense):
            engine.out = engine.step(x, y, step % 4 != 3)
        # rounding apart (relu units near 0 may flip, and the differences then grow)
        torch.testing.assert_close(fast.out[0], dense.out[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.out[1], dense.out[1], rtol=1e-3, atol=1e-4)
    # the members' modules still read the stack, and W0's transposed storage reads right
    for m, (got, want) in enumerate(zip(fast.W, dense.W, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=f"layer {m}")
    x = torch.from_numpy(sparse_rows(5, sizes[0], seed=99))
    model = build_mlp(sizes, activation)
    outputs = []
    for engine in (fast, dense):
        for lin, w, b in zip(linear_layers(model), engine.W, engine.b, strict=True):
            lin.weight.data, lin.bias.data = w[1], b[1]
        outputs.append(model(x))
    assert fast.W[0][1].shape == (sizes[1], sizes[0]) and not fast.W[0][1].is_contiguous()
    torch.testing.assert_close(*outputs, rtol=1e-3, atol=1e-5)
    for got, want in zip(fast.flush(steps, 1), dense.flush(steps, 1), strict=True):
        assert_records_close(got, want, rtol=1e-3, atol=1e-8)


def test_sparse_first_layer_only_where_it_pays():
    def sparse_of(**options):
        torch.manual_seed(0)
        model = build_mlp((64, 8, 10), "relu")
        return StackedMLP([model], "relu", batch_size=4, **options)._sparse

    assert sparse_of(input_density=0.2) is sparse
    assert sparse_of(input_density=sparse.MAX_DENSITY + 0.01) is None
    assert sparse_of(input_density=0.2, fused=False) is None
    assert sparse_of() is None  # density unknown: dense


def sparse_data(n_train=192, n_test=64, features=784):
    g = torch.Generator().manual_seed(0)
    splits = []
    for n, seed in ((n_train, 1), (n_test, 2)):
        x = torch.from_numpy(sparse_rows(n, features, seed=seed, density=0.1))
        y = torch.randint(0, 10, (n,), generator=g)
        splits.append(Split(x, y))
    return Data(*splits)


def test_nonzero_fraction():
    x = torch.zeros(10, 10)
    x[0, :3] = 1
    assert nonzero_fraction(x) == 0.03
    assert 0.1 < nonzero_fraction(sparse_data().train.x) < 0.2


def test_train_fused_on_sparse_inputs_records_as_autograd(monkeypatch):
    calls = []
    original = sparse.forward
    monkeypatch.setattr(sparse, "forward", lambda *a: calls.append(1) or original(*a))
    data = sparse_data()
    config = make_config(depth=3, widths=(32, 24), activation="tanh", batch_size=32, epochs=2,
                         lr=0.2, log_every=1)
    fused = train(dataclasses.replace(config, engine="fused"), data=data)
    reference = train(config, data=data)
    assert len(calls) == 12 + 2  # every step (2 epochs of 6), and each epoch's evaluation
    for column in ("loss", "accuracy"):
        np.testing.assert_allclose(fused.epochs[column], reference.epochs[column], rtol=1e-5)
    assert len(fused.grads) == len(reference.grads) == 12 * 3
    assert_records_close(fused.grads, reference.grads, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("threaded", [True, False])
def test_nonzeros_listed_in_the_gather_thread_equal_those_listed_in_the_step(threaded):
    from gradlab.engines.batches import gather_batches

    data = sparse_data(n_train=40 * 24 + 5)  # 40 full steps of 2 members and a short one
    pair = []
    for _ in range(2):
        torch.manual_seed(0)
        models = [build_mlp((784, 16, 10), "sigmoid") for _ in range(2)]
        pair.append(StackedMLP(models, "sigmoid", batch_size=24, lr=0.1, max_rows=64,
                               input_density=0.1))
    ahead, inline = pair
    g = torch.Generator().manual_seed(0)
    orders = [torch.randperm(len(data.train), generator=g).split(24) for _ in range(2)]
    indices = [torch.stack(step) for step in zip(*orders, strict=True)]
    assert indices[-1].shape == (2, 5)
    for x, y, nonzeros in gather_batches(data.train.x, data.train.y, indices, threaded,
                                         prepare=ahead.list_nonzeros):
        a = ahead.step(x, y, True, nonzeros)
        b = inline.step(x, y, True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(ahead.params, inline.params)


def test_recording_does_not_change_the_sparse_engine():
    on, off = engine_pair("tanh", [dict(input_density=0.2)] * 2, sizes=(64, 21, 10),
                          batch_size=24)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        x = torch.from_numpy(sparse_rows(2 * 24, 64, seed=step)).view(2, 24, -1)
        y = torch.randint(0, 10, (2, 24), generator=g)
        assert torch.equal(on.step(x, y, True)[0], off.step(x, y, False)[0]), step
    assert torch.equal(on.params, off.params)


def test_sparse_engine_with_momentum_equals_the_dense_engine():
    fast, dense = engine_pair("sigmoid", [dict(input_density=0.2), dict(input_density=1.0)],
                              sizes=(64, 21, 10), batch_size=24, lr=0.1, momentum=0.9)
    assert fast.sparse and not fast.optimizer.fused_sgd  # momentum: the eager optimizer
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        x = torch.from_numpy(sparse_rows(2 * 24, 64, seed=step)).view(2, 24, -1)
        y = torch.randint(0, 10, (2, 24), generator=g)
        for engine in (fast, dense):
            engine.step(x, y, True)
    for got, want in zip(fast.flush(list(range(12)), 1), dense.flush(list(range(12)), 1),
                         strict=True):
        assert_records_close(got, want, rtol=1e-4, atol=1e-8)


def test_evaluation_lists_shared_by_engines_until_x_changes(monkeypatch):
    calls = []
    original = sparse.list_nonzeros
    monkeypatch.setattr(sparse, "list_nonzeros",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    x = sparse_data(n_test=50).test.x.clone()
    engines = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models = [build_mlp((784, 20, 10), "relu") for _ in range(2)]
        engines.append((StackedMLP(models, "relu", batch_size=8, max_rows=4,
                                   input_density=0.1), models))
    for mutate in (False, False, True):
        if mutate:
            x[3, 5] = 0.5  # an in-place change: listed again
        for engine, models in engines:
            for first_layer, model in zip(engine.first_layers(x), models, strict=True):
                torch.testing.assert_close(first_layer(10, 50), model[0](x[10:50]),
                                           rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_lists_grow_for_a_larger_group_at_the_data_density():
    x = sparse_rows(40, 50, density=0.1)
    small = sparse.buffers(4, 50, 0.1, 2)
    grown = sparse.list_nonzeros(x.reshape(-1), 50, small, np.arange(0, 41, 10), density=0.1)
    assert len(grown["pair_start"]) >= 40 // 2 + 4 + 1
    assert len(grown["keys"]) < 40 * 50 // 2  # sized for the density, not for every entry
    reference = sparse.list_nonzeros(x.reshape(-1), 50, sparse.buffers(40, 50, 1.0, 4),
                                     np.arange(0, 41, 10))
    n = reference["pair_start"][20]
    assert grown["pair_start"][20] == n
    np.testing.assert_array_equal(grown["keys"][:n], reference["keys"][:n])
    np.testing.assert_array_equal(grown["column_rows"][:np.count_nonzero(x)],
                                  reference["column_rows"][:np.count_nonzero(x)])
