"""Each unit's count of z > 0 in one pass over z: the recorder's relu-family f' on a CPU.

``GradientRecorder`` keeps, for a layer followed by relu, leaky_relu or elu, only how often each
unit's z was positive (f' follows from it). In PyTorch that is two passes and a scratch tensor
(``gt`` into float flags, then a sum over every axis but the units'); this numba kernel reads z
once and writes only the counts - about a third of the memory traffic, which is what the
recorder's time on a convolution's output is (``benchmarks/RESULTS.md``, issue 14). Optional:
``count_positive_into`` returns False where it does not apply (no numba, not a contiguous
float32 CPU tensor), and the caller runs its PyTorch ops. Counts are integers: the same bits
either way, so records do not depend on whether numba is installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

# reassoc: the float32 sums may be split into vector lanes; no nnan: NaN > 0 must stay False
_FLAGS = {"reassoc", "contract"}
EXACT = 1 << 24  # float32 counts are exact below 2**24


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _count_units_inner(z, out, add):  # pragma: no cover - compiled
    """z (outer, units, inner): out[u] (+)= the number of z[:, u, :] > 0."""
    outer, width, inner = z.shape
    for u in range(width):
        total = 0.0
        for i in range(outer):
            row = z[i, u]
            count = np.float32(0)
            for k in range(inner):
                count += np.float32(1) if row[k] > 0 else np.float32(0)
            total += count
        out[u] = out[u] + total if add else total


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _count_units_last(z, out, add):  # pragma: no cover - compiled
    """z (rows, units): out[u] (+)= the number of z[:, u] > 0."""
    rows, width = z.shape
    counts = np.zeros(width, np.float32)
    for i in range(rows):
        row = z[i]
        for u in range(width):
            counts[u] += np.float32(1) if row[u] > 0 else np.float32(0)
    for u in range(width):
        out[u] = out[u] + counts[u] if add else counts[u]


def count_positive_into(z: torch.Tensor, axis: int, out: torch.Tensor, add: bool) -> bool:
    """Write (``add``: add) each unit's count of ``z > 0`` into the float32 ``out`` (units,);
    ``axis``: the unit axis, counted from the end (-1: features; -3: a Conv2d's channels).
    Returns False, touching nothing, where the kernel does not apply."""
    if (z.device.type != "cpu" or z.dtype != torch.float32 or out.dtype != torch.float32
            or not z.is_contiguous() or not out.is_contiguous()):
        return False
    shape = z.shape
    width = shape[axis]
    if z.numel() >= EXACT * width:  # a unit's count could pass 2**24
        return False
    inner = math.prod(shape[len(shape) + axis + 1:])
    values = z.numpy()
    if inner == 1:
        _count_units_last(values.reshape(-1, width), out.numpy(), add)
    else:
        _count_units_inner(values.reshape(-1, width, inner), out.numpy(), add)
    return True

