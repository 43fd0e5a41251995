"""Sums of squares of many float32 CPU tensors in one numba call: the recorder's norms on a CPU.

``record.norms`` takes a recorded step's norms (dL/dz, each ``.grad``, each weight: a dozen
tensors on the tutorial net, up to 38.6M entries each on a large output layer) here. Each sum is
``fused.squares``: float32 squares summed per tile of ``fused.TILE`` floats (vectorised), the
tiles summed in float64, a tile whose float32 sum may have lost squares to underflow (or that
overflowed) summed again in float64. So every norm is within float64 rounding of the sum of
its float32 squares plus a few float32 roundings per tile (relative error under 3e-7 at any
size, ``tests/test_norms.py``), exact down to the smallest positive float32 and up to the
largest, in one pass over the memory.

One call takes every tensor by address (``data_ptr``) and length, so its cost beyond that pass
is one dispatch, not one per tensor: the tutorial net's norms take 26 µs a recorded step,
against 62 µs for PyTorch's fused float32 norm (which drifts: 1e-4 off at 200,704 entries) and
175 µs for its float64 one (AMD EPYC, 1 thread). Optional (``record.fprime.optional_kernel``):
without numba the recorder accumulates in float64 with PyTorch ops, to the same bound.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit, types
from numba.extending import intrinsic

from .fused import FLAGS, squares


@intrinsic
def _floats_at(typingctx, address):
    """The int64 ``address`` as a pointer to float32."""
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@njit(fastmath=FLAGS, nogil=True, cache=True)
def squares_at(where, out):  # pragma: no cover - compiled
    """``out[k]`` = the sum of squares (float64) of the ``where[k, 1]`` float32 values at
    address ``where[k, 0]``, for each row of the (k, 2) int64 array ``where``."""
    for k in range(where.shape[0]):
        out[k] = squares(carray(_floats_at(where[k, 0]), (where[k, 1],)))


def squares_into(out: np.ndarray, tensors: list[torch.Tensor | None]) -> bool:
    """``out[k]`` = the sum of squares of ``tensors[k]`` in float64, where every tensor is a
    contiguous float32 CPU tensor; returns whether they were (else ``out`` is untouched). The
    tensors are read through their addresses while the list holds them."""
    where = [(t.data_ptr(), t.numel()) for t in tensors if t is not None
             and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()]
    if len(where) != len(tensors):
        return False
    squares_at(np.array(where, dtype=np.int64).reshape(-1, 2), out)
    return True
