"""Exact 2-norms of many tensors at once, written into a row buffer without a host sync.

Norms are exact down to the smallest positive float32 (a float32 square underflows below
~1e-19): on the CPU each norm is taken in float32 and taken again accumulating in float64 only
where the float32 one is too small (or not finite) to be trusted - reading a CPU tensor is no
device synchronisation; on other devices every norm accumulates in float64 (MPS, without
float64: scaled by the largest entry first, as LAPACK's nrm2 does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import compat

# A float32 norm at least this large lost nothing to underflow: the squares that underflow
# (below ~1e-45 each) add less than 1e-44 per entry to a sum of at least 1e-30.
TRUSTED_NORM = 1e-15


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
    real = [t for t in tensors if t is not None]
    found = iter([norm.item() for norm in compat.foreach_norm(real)] if real else ())
    values = [math.nan if t is None else next(found) for t in tensors]
    for i, value in enumerate(values):
        if not TRUSTED_NORM <= value < math.inf and tensors[i] is not None:  # (NaN fails too)
            values[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64).item()
    values.extend(value.item() for value in extra)
    out[:] = values


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
    """The 2-norm of ``t`` scaled by its largest entry first (no float64 needed)."""
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
