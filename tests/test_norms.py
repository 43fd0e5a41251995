"""``record.norms`` against float64 norms of the same entries, on every path it takes (the numba
kernel for contiguous float32, one fused float64 call, float32 pieces summed in float64) and in
every dtype: at 38.6M entries (a GPT-2 sized output layer, watched), at mid sizes whose float32
sums drift (4,096 to 200,704 entries: lognormal, constant and Student-t entries), in half
precision (bf16 autocast), at the float32 extremes, with a tail that fills no chunk; and the
fused engine's sums of squares too."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab import compat, record
from gradlab.record import norms

HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float64, *HALF)
BOUND = 1e-6  # relative, against the norm accumulated in float64


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """With the numba kernel (where numba is installed) and with PyTorch ops only."""
    if request.param == "kernel":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(record, "USE_KERNELS", False)
    return request.param


def reference(t: torch.Tensor) -> float:
    """The norm of the same entries accumulated in float64."""
    return torch.linalg.vector_norm(t, dtype=torch.float64).item()


def relative_error(got: float, t: torch.Tensor) -> float:
    exact = reference(t)
    return abs(got - exact) / exact


def entries(kind: str, numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``numel`` entries of one kind, as ``dtype`` (the reference takes the rounded ones)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "lognormal":  # (sigma 1 in half precision: float16 overflows beyond 65504)
        t = torch.exp(torch.randn(numel, generator=g, dtype=torch.float64)
                      * (1.0 if dtype in HALF else 2.0))
    elif kind == "constant":
        t = torch.full((numel,), 1 / 3, dtype=torch.float64)
    elif kind == "student_t":
        t = torch.distributions.StudentT(2.5).sample((numel,)).double()
        t = t.clamp(-1e4, 1e4)
    else:  # "normal": a weight's or a gradient's
        t = torch.randn(numel, generator=g, dtype=torch.float64) * 0.02 + 0.01
    return t.to(dtype)


SLOW = pytest.mark.slow  # (5 to 12 s each here)


@pytest.mark.parametrize("layout", ["contiguous", pytest.param("transposed", marks=SLOW)])
@pytest.mark.parametrize("dtype", [torch.float32, *(pytest.param(d, marks=SLOW)
                                                    for d in DTYPES[1:])])
def test_a_38_6m_entry_norm_is_exact(path, dtype, layout):
    """nn.Linear(768, 50304)'s weight: a float32 sum is 2.7e-3 off (constant entries: 3e-2);
    every path and dtype within 1e-6 of float64 (also through a transposed view)."""
    g = torch.Generator().manual_seed(0)
    for weight in ((torch.randn(50304, 768, generator=g) * 0.02 + 0.01).to(dtype),
                   torch.full((50304, 768), 1 / 3, dtype=dtype)):
        if dtype == torch.float32 and layout == "contiguous":
            assert relative_error(compat.foreach_norm([weight])[0].item(), weight) > 1e-3
        tensor = weight.t() if layout == "transposed" else weight
        assert relative_error(record.exact_norms([tensor])[0], tensor) <= BOUND
        del weight, tensor


def test_a_watched_38_6m_weight_layer_against_autograd(path):
    """The issue's huge layer: weight_norm, grad_weight_norm, update_ratio and dL/dz (4 x 50304)
    of one watched SGD step against autograd on a copy, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 768), nn.Tanh(), nn.Linear(768, 50304))
    x, y = torch.randn(4, 16), torch.randint(0, 50304, (4,))
    twin = copy.deepcopy(model)
    z = twin[2](twin[1](twin[0](x)))
    dz, dw = torch.autograd.grad(F.cross_entropy(z, y), [z, twin[2].weight])
    weight = reference(twin[2].weight.detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    row = rec.flush().set_index("layer_name").loc["2"]
    assert row["weight_norm"] == pytest.approx(weight, rel=BOUND)
    assert row["grad_weight_norm"] == pytest.approx(reference(dw), rel=BOUND)
    assert row["grad_output_norm"] == pytest.approx(reference(dz), rel=BOUND)
    assert row["update_ratio"] == pytest.approx(0.1 * reference(dw) / weight, rel=BOUND)


SIZES = [1, 10, 300, 4096, 7840, 16384, 100_352, 200_704, norms.FLOAT64_MAX,
         norms.FLOAT64_MAX + 1]


@pytest.mark.parametrize("kind", ["lognormal", "constant", "student_t", "normal"])
@pytest.mark.parametrize("numel", SIZES)
def test_every_size_and_dtype_is_within_the_bound(path, numel, kind):
    """From 1 entry to 1M (both sides of FLOAT64_MAX), where PyTorch's fused float32 norm
    drifts (5e-6 at 7,840 entries, 1e-4 at 200,704): each dtype within 1e-6 of float64, in one
    call with the others (as a recorded row is taken: the paths' results land in their own
    places), contiguous and through a non-contiguous view."""
    tensors = [entries(kind, numel, dtype, seed=numel) for dtype in DTYPES]
    strided = [entries(kind, 2 * numel, dtype, seed=numel + 1)[::2] for dtype in DTYPES]
    every = [*tensors, None, *strided]
    got = record.exact_norms(every)
    assert np.isnan(got[len(tensors)])
    for value, t in zip(got, every, strict=True):
        if t is not None:
            assert relative_error(value, t) <= BOUND, (t.dtype, t.is_contiguous())
    if kind == "constant" and numel >= 7840:  # the drift the bound rules out
        assert relative_error(compat.foreach_norm(tensors[:1])[0].item(), tensors[0]) > BOUND


@pytest.mark.parametrize("numel", [norms.FLOAT64_MAX + 1, norms.FLOAT64_MAX + norms.CHUNK - 1,
                                   4 * norms.FLOAT64_MAX])
def test_every_entry_counts_once(path, numel):
    """Tiles, chunks and a tail that fills none: the tail's large entry and the others' small
    ones each count once (also in float64, and through a transposed, non-contiguous view)."""
    g = torch.Generator().manual_seed(numel)
    t = torch.rand(numel, generator=g) * 1e-3
    t[-1] = 0.5  # in the tail where numel is no multiple of CHUNK or of the kernel's tile
    matrix = (torch.rand(64, numel // 64 + 1, generator=g) * 1e-3).t()
    for tensor in (t, t.double(), matrix, t[1:]):
        assert relative_error(record.exact_norms([tensor])[0], tensor) <= BOUND


@pytest.mark.parametrize("numel", [5, 3000, 2 * norms.FLOAT64_MAX + 3])
def test_the_float32_extremes(path, numel):
    """Where float32 squares underflow or overflow, each path is still exact: entries down to
    the smallest positive float32, up to 1e30, and a few large entries beside many tiny ones."""
    tiny = torch.full((numel,), 1.4e-45)  # the smallest positive float32
    small = torch.full((numel,), 1e-30)
    huge = torch.full((numel,), 1e30)
    mixed = torch.full((numel,), 1e-25)
    mixed[:3] = 1.0  # outweighs the underflowing rest
    for tensor in (tiny, small, huge, mixed):
        for t in (tensor, tensor.view(1, -1).t()[::1]):
            assert relative_error(record.exact_norms([t])[0], t) <= 1e-7
    with_inf, with_nan = torch.ones(numel), torch.ones(numel)
    with_inf[numel // 2], with_nan[-1] = float("inf"), float("nan")
    got = record.exact_norms([with_inf, with_nan])
    assert got[0] == float("inf") and np.isnan(got[1])
    assert record.exact_norms([torch.zeros(numel), torch.zeros(0)]) == [0.0, 0.0]


def test_the_fused_engines_sums_of_squares():
    """The fused engine's squared norms (``block_squares``, and ``sgd_step_norms`` while it
    updates the weights) within the bound too: constant entries at several values, lognormal
    and Student-t ones, up to 1M entries."""
    fused = pytest.importorskip("gradlab.engines.fused")
    for numel in (4096, 200_704, 1_000_000):
        for kind, value in [("constant", None), ("lognormal", None), ("student_t", None),
                            *[("value", v) for v in (0.1, 0.7, 2.3, 9.1)]]:
            x = (torch.full((numel,), value) if kind == "value"
                 else entries(kind, numel, torch.float32)).numpy()
            exact = np.sqrt(np.sum(x.astype(np.float64) ** 2))
            out = np.zeros(1)
            fused.block_squares(x, np.array([[0, numel]], np.int64), out)
            params, both = x.copy(), np.zeros(2)
            fused.sgd_step_norms(params, x.copy(), np.float32(0.0),
                                 np.array([[0, numel, 0, 1]], np.int64),
                                 np.zeros(1, np.float32), np.zeros((0, 3), np.int64), both)
            for squares in (out[0], *both):
                assert abs(np.sqrt(squares) - exact) / exact <= BOUND, (numel, kind, value)


@pytest.mark.parametrize("private", [True, False])
def test_foreach_norm_accumulates_in_the_dtype_asked(monkeypatch, private):
    """``compat.foreach_norm(tensors, float64)`` equals each tensor's float64 norm (also by the
    public fallback, in a torch without ``_foreach_norm``)."""
    if not private:
        monkeypatch.delattr(torch, "_foreach_norm", raising=False)
    tensors = [entries("constant", 200_704, torch.float32), entries("normal", 300, torch.bfloat16)]
    for got, t in zip(compat.foreach_norm(tensors, torch.float64), tensors, strict=True):
        assert got.dtype == torch.float64 and got.item() == reference(t)


@pytest.mark.parametrize("dtype", HALF)
def test_mps_scaled_norm_accumulates_half_precision_in_float32(dtype):
    """MPS's scaled norm, run here on the CPU (whose float32 sum, unlike a GPU's tree, drifts
    beyond a few thousand entries: a batch x width dL/dz size)."""
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(64, 128, generator=g) * 0.02 + 0.01).to(dtype)
    assert relative_error(norms.scaled_norm(t).item(), t) <= BOUND


def test_bf16_autocast_grad_output_norm_against_autograd(path):
    """Under bf16 autocast dL/dz is bf16: its recorded norm is that of the same bf16 entries,
    in float64, not the norm rounded to bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                          nn.Linear(48, 5))
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    twin, outputs = copy.deepcopy(model), []
    for i in (0, 2, 4):
        twin[i].register_forward_hook(lambda _m, _i, out: outputs.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(twin(x), y)
    expected = [reference(dz) for dz in torch.autograd.grad(loss, outputs)]
    assert all(out.dtype == torch.bfloat16 for out in outputs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    frame = rec.flush().sort_values("layer")
    np.testing.assert_allclose(frame["grad_output_norm"], expected, rtol=BOUND)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_device_norms_accumulate_in_float64(dtype):
    g = torch.Generator().manual_seed(2)
    t = (torch.randn(50304, 768, generator=g) * 0.02 + 0.01).to(dtype)
    got = record.exact_norms([t.cuda()])[0]
    assert relative_error(got, t) <= BOUND
