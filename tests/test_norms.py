"""``record.norms`` against float64 norms of the same entries: at 38.6M entries (a GPT-2 sized
output layer, watched), in half precision (bf16 autocast), at the float32 extremes, with a tail
that fills no chunk; and today's fused float32 norm kept bit for bit up to ``FUSED_MAX`` entries
(the records of gradlab's own experiments)."""

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


def reference(t: torch.Tensor) -> float:
    """The norm of the same entries accumulated in float64."""
    return torch.linalg.vector_norm(t, dtype=torch.float64).item()


def relative_error(got: float, t: torch.Tensor) -> float:
    exact = reference(t)
    return abs(got - exact) / exact


def test_a_38_6m_entry_norm_is_exact():
    """nn.Linear(768, 50304)'s weight: a float32 sum is 2.7e-3 off (constant entries: 3e-2)."""
    g = torch.Generator().manual_seed(0)
    for weight in (torch.randn(50304, 768, generator=g) * 0.02 + 0.01,
                   torch.full((50304, 768), 1 / 3)):
        assert relative_error(compat.foreach_norm([weight])[0].item(), weight) > 1e-3
        assert relative_error(record.exact_norms([weight])[0], weight) <= 1e-6


def test_a_watched_38_6m_weight_layer_against_autograd():
    """The issue's huge layer: weight_norm, grad_weight_norm, update_ratio and dL/dz (4 x 50304,
    above FUSED_MAX too) of one watched SGD step against autograd on a copy, in float64."""
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
    assert row["weight_norm"] == pytest.approx(weight, rel=1e-6)
    assert row["grad_weight_norm"] == pytest.approx(reference(dw), rel=1e-6)
    assert row["grad_output_norm"] == pytest.approx(reference(dz), rel=1e-6)
    assert row["update_ratio"] == pytest.approx(0.1 * reference(dw) / weight, rel=1e-6)


@pytest.mark.parametrize("numel", [1, 30_000, 784 * 128, norms.FUSED_MAX])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_path_is_unchanged_up_to_fused_max(numel, dtype):
    """Up to FUSED_MAX entries a float32 / float64 norm is the fused one in its own dtype, bit
    for bit (tiny ones: retaken in float64, as before), so earlier records stay identical."""
    g = torch.Generator().manual_seed(numel)
    tensors = [(torch.randn(numel, generator=g) * 0.02 + 0.01).to(dtype),
               torch.full((numel,), 3e-20, dtype=dtype)]
    got = record.exact_norms(tensors)
    assert got[0] == compat.foreach_norm(tensors[:1])[0].item()
    assert got[1] == torch.linalg.vector_norm(tensors[1], dtype=torch.float64).item()


@pytest.mark.parametrize("numel", [norms.FUSED_MAX + 1, norms.FUSED_MAX + norms.CHUNK - 1,
                                   4 * norms.FUSED_MAX])
def test_above_fused_max_every_entry_counts_once(numel):
    """Chunks and a tail that fills none: the tail's large entry and the chunks' small ones each
    count once (also in float64, and through a transposed, non-contiguous view)."""
    g = torch.Generator().manual_seed(numel)
    t = torch.rand(numel, generator=g) * 1e-3
    t[-1] = 0.5  # in the tail where numel is no multiple of CHUNK
    matrix = (torch.rand(64, numel // 64 + 1, generator=g) * 1e-3).t()
    for tensor in (t, t.double(), matrix):
        assert relative_error(record.exact_norms([tensor])[0], tensor) <= 1e-6


def test_large_tensors_at_the_float32_extremes():
    """Where float32 squares underflow or overflow, a large tensor is retaken in float64."""
    n = 2 * norms.FUSED_MAX + 3
    tiny = torch.full((n,), 1.4e-45)  # the smallest positive float32
    small = torch.full((n,), 1e-30)
    huge = torch.full((n,), 1e30)
    mixed = torch.full((n,), 1e-25)
    mixed[:norms.CHUNK] = 1.0  # one chunk outweighs the underflowing rest
    for tensor in (tiny, small, huge, mixed):
        assert relative_error(record.exact_norms([tensor])[0], tensor) <= 1e-7
    with_inf, with_nan = torch.ones(n), torch.ones(n)
    with_inf[7], with_nan[-1] = float("inf"), float("nan")
    got = record.exact_norms([with_inf, with_nan])
    assert got[0] == float("inf") and np.isnan(got[1])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(64, 128), (3, 1000), (norms.FUSED_MAX + 5,)])
def test_half_precision_accumulates_in_float32(dtype, shape):
    """A half-precision norm is not rounded to its dtype (2^-9 for bf16): within 1e-6 of
    float64 on the same entries."""
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(shape, generator=g) * 0.02 + 0.01).to(dtype)
    assert relative_error(record.exact_norms([t])[0], t) <= 1e-6


@pytest.mark.parametrize("dtype", HALF)
def test_mps_scaled_norm_accumulates_half_precision_in_float32(dtype):
    """MPS's scaled norm, run here on the CPU (whose float32 sum, unlike a GPU's tree, drifts
    beyond a few thousand entries: a batch x width dL/dz size)."""
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(64, 128, generator=g) * 0.02 + 0.01).to(dtype)
    assert relative_error(norms.scaled_norm(t).item(), t) <= 1e-6


def test_bf16_autocast_grad_output_norm_against_autograd():
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
    np.testing.assert_allclose(frame["grad_output_norm"], expected, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_device_norms_accumulate_in_float64(dtype):
    g = torch.Generator().manual_seed(2)
    t = (torch.randn(50304, 768, generator=g) * 0.02 + 0.01).to(dtype)
    got = record.exact_norms([t.cuda()])[0]
    assert relative_error(got, t) <= 1e-6
