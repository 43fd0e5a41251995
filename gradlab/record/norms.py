"""2-norms of many tensors at once, written into a row buffer without a host sync.

Norms are exact down to the smallest positive float32 (a float32 square underflows below
~1e-19). On the CPU:

* a float32 or float64 tensor of at most ``FUSED_MAX`` entries: one fused norm in its own dtype
  (``compat.foreach_norm``) - the path every record of gradlab's own experiments was taken by,
  kept bit for bit (so its float32 sum's drift, below, stays too);
* a larger one, or any half-precision one: norms of ``CHUNK``-entry pieces in float32 (float64
  for float64) whose squares are summed in float64 (``chunked_norm``): within 1e-6 of the
  float64 norm at any size (2e-7 at 38.6M entries);

either taken again accumulating in float64 where too small (or not finite) to be trusted -
reading a CPU tensor is no device synchronisation. On other devices every norm accumulates in
float64 (MPS, without float64: scaled by the largest entry first, as LAPACK's nrm2 does, and
accumulated in float32, half precision too).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import compat

# A float32 norm at least this large lost nothing to underflow: the squares that underflow
# (below ~1e-45 each) add less than 1e-44 per entry to a sum of at least 1e-30. Beyond FUSED_MAX
# entries the bound grows with sqrt(numel), which keeps that loss below ~3e-10 at any size.
TRUSTED_NORM = 1e-15

FUSED_DTYPES = (torch.float32, torch.float64)

# The fused float32 sum drifts as a tensor grows: relative error against float64, worst of
# normal, shifted normal, uniform, lognormal and Student-t entries / of constant ones, 2.6e-7 /
# 2.5e-6 at 4,096 entries, 2.3e-6 / 1e-5 at 16,384, 2.5e-5 / 1.6e-4 at 200,704 (normal alone:
# 1.6e-6) and 2.7e-3 / 2.8e-2 at 38.6M. It is kept up to the largest tensor of gradlab's own
# experiments (784x256) only so that their records keep every bit.
FUSED_MAX = 784 * 256

# Entries per float32 piece: each piece's norm is then within ~1e-7 (a few float32 roundings),
# so is their total (38.6M entries: 2e-7 for constant entries, 1e-10 for random ones), and the
# pieces' norms (one vector_norm over a 2-d view) cost about what one fused norm does; float64
# accumulation costs 20x that.
CHUNK = 256

# Pieces per vector_norm call: half precision is converted to float32 1 MiB at a time (at 38.6M
# entries 13 ms, against 150 ms converting the whole tensor at once).
BLOCK_ROWS = 1024


def norms_into(out: torch.Tensor | np.ndarray, tensors: list[torch.Tensor | None],
               extra: tuple[torch.Tensor, ...] = ()) -> None:
    """Write the 2-norm of each tensor (None: NaN), then the 0-d ``extra`` values, into the
    1-d ``out``.

    ``out``: a tensor on the tensors' device, or for CPU tensors a numpy array (a CPU buffer's
    host view: the values are written without a further torch operation)."""
    if not isinstance(out, np.ndarray):
        if out.device.type != "cpu":
            _device_norms_into(out, tensors, extra)
            return
        out = out.numpy()
    # (the step loop's case first: every tensor there and small enough for the fused norm, its
    # checks in C (min, sum); the general path's per-tensor Python cost 8 µs a recorded step)
    if all(map(_fusable, tensors)):
        values = [norm.item() for norm in compat.foreach_norm(tensors)] if tensors else []
        fused = [True] * len(values)
        trusted = not values or (TRUSTED_NORM <= min(values) and sum(values) < math.inf)
    else:
        fused = list(map(_fusable, tensors))
        found = compat.foreach_norm([t for t, f in zip(tensors, fused) if f]) if any(fused) else ()
        found = iter([norm.item() for norm in found])
        values = [next(found) if f else math.nan if t is None else chunked_norm(t)
                  for t, f in zip(tensors, fused)]
        trusted = False
    if not trusted:
        for i, value in enumerate(values):
            if fused[i] and not TRUSTED_NORM <= value < math.inf:  # (NaN fails too)
                values[i] = _float64_norm(tensors[i]).item()
    values.extend(value.item() for value in extra)
    out[:] = values


def _fusable(t: torch.Tensor | None) -> bool:
    """Whether ``t``'s norm is taken by the fused float32 path (there, small, float32/64)."""
    return t is not None and t.numel() <= FUSED_MAX and t.dtype in FUSED_DTYPES


@torch.no_grad()
def chunked_norm(t: torch.Tensor) -> float:
    """The 2-norm of ``t`` from the norms of its ``CHUNK``-entry pieces (the last may be
    shorter), each accumulated in float32 (half precision too; float64 for float64), their
    squares summed in float64; taken again in float64 where too small (or not finite) to be
    trusted."""
    flat = t.reshape(-1)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    whole = flat.numel() - flat.numel() % CHUNK
    pieces = [torch.linalg.vector_norm(rows, dim=1, dtype=dtype)
              for rows in flat[:whole].view(-1, CHUNK).split(BLOCK_ROWS)]
    pieces.append(torch.linalg.vector_norm(flat[whole:], dtype=dtype).reshape(1))
    norm = torch.linalg.vector_norm(torch.cat(pieces), dtype=torch.float64).item()
    if TRUSTED_NORM * math.sqrt(max(flat.numel() / FUSED_MAX, 1.0)) <= norm < math.inf:
        return norm
    return _float64_norm(t).item()


@torch.no_grad()  # (gradients of backward(create_graph=True) require grad)
def _device_norms_into(out: torch.Tensor, tensors: list[torch.Tensor | None],
                       extra: tuple[torch.Tensor, ...]) -> None:
    """``norms_into`` on a device: every norm accumulated in float64 (MPS: scaled), no
    synchronisation."""
    nan = out.new_full((), math.nan)
    norm = scaled_norm if out.device.type == "mps" else _float64_norm
    norms = [nan if t is None else norm(t).to(out.dtype) for t in tensors]
    torch.stack([*norms, *(e.to(out.dtype) for e in extra)], out=out)


def _float64_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.float64)


def scaled_norm(t: torch.Tensor) -> torch.Tensor:
    """The 2-norm of ``t`` scaled by its largest entry first (no float64 needed; half
    precision in float32)."""
    t = t.float()
    largest = t.abs().amax()
    scaled = torch.linalg.vector_norm(t / largest) * largest
    return torch.where(largest > 0, scaled, largest)


def exact_norms(tensors: list[torch.Tensor | None]) -> list[float]:
    """The 2-norm of each tensor as ``norms_into`` takes it, on the host (None: NaN)."""
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    dtype = torch.float32 if device.type == "mps" else torch.float64
    out = torch.empty(len(tensors), dtype=dtype, device=device)
    norms_into(out, tensors)
    return out.tolist()
