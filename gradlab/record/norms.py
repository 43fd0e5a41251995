"""2-norms of many tensors at once, written into a row buffer without a host sync.

Every norm is within float64 rounding of the exact norm of its entries: relative error under
1e-6 against the norm accumulated in float64 (measured at most 3e-7), at any size (tested from
1 entry to 38.6M: a GPT-2 sized output layer) and in any dtype (float32, float64, float16,
bfloat16), and exact down to the smallest positive float32 (whose square underflows in float32)
and up to the largest. On the CPU:

* a contiguous float32 tensor - dL/dz, ``.grad`` and the weights of a float32 model, so nearly
  every norm - by one numba call for all of them (``engines.squares``): float32 squares summed
  in tiles of 512 floats, the tiles in float64, one pass over the memory;
* any other (float64, half precision, not contiguous, or every tensor where numba is missing or
  ``record.USE_KERNELS`` is off): accumulated in float64, one fused call for all those of at
  most ``FLOAT64_MAX`` entries; a larger one from the float32 (float64 for float64) norms of its
  ``CHUNK``-entry pieces, their squares summed in float64 (``chunked_norm``).

Why not PyTorch's float32 norm, as before: it sums float32 squares in a few vector lanes, so
its error grows with the size - against float64, for lognormal, Student-t, normal and constant
entries, up to 5e-6 at 7,840 entries, 1e-4 at 200,704, 7e-4 at 1M and 3e-2 at 38.6M. Accumulating
in float64 throughout is exact but costs 3x that (a float32 tensor is converted on the way);
the numba kernel costs less than either: the tutorial net's norms (12 tensors, 300k entries)
take 26 µs a recorded step against 62 µs fused in float32 and 175 µs in float64 (AMD EPYC, 1
thread; ``benchmarks/RESULTS.md``). The two ways of a float32 norm agree to the bound above, not
bit for bit: a record taken with numba and one taken without differ in the last few digits.

On other devices every norm accumulates in float64 (MPS, without float64: scaled by the largest
entry first, as LAPACK's nrm2 does, and accumulated in float32, half precision too).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import compat
from .fprime import optional_kernel

# A norm by float32 pieces of at least TRUSTED_NORM * sqrt(numel) lost nothing to underflow:
# each entry's square loses less than 1e-45 where float32 underflows, at most 1e-45 * numel in
# all, under 1e-8 of a sum of squares of at least 1e-36 * numel. (Below, or not finite: the
# norm is taken again in float64.)
TRUSTED_NORM = 1e-18

# Up to this many entries a tensor the kernel does not take is accumulated in float64, in one
# fused call with the others; a larger one costs less by pieces (``chunked_norm``: at 1M
# entries the two are even, at 38.6M pieces take 20 ms against 240 ms in float64).
FLOAT64_MAX = 1 << 20

# Entries per float32 piece of ``chunked_norm``: even summed one by one (a strided row is) a
# piece's norm is then within ~2e-7 (a few float32 roundings), so is their total. (256: 1.3e-6
# for constant entries summed one by one.)
CHUNK = 64

# Pieces per vector_norm call: half precision is converted to float32 a block (1 MiB) at a time
# (at 38.6M entries 25 to 30 ms, against 140 ms converting the whole tensor at once).
BLOCK_ROWS = 4096


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
    n = len(tensors)
    squares = _squares_kernel()
    if squares is not None and squares(out[:n], tensors):  # (the step loop's case: all)
        np.sqrt(out[:n], out=out[:n])
    else:
        out[:n] = _norms(tensors, squares)
    if extra:
        out[n:n + len(extra)] = [value.item() for value in extra]


def _norms(tensors: list[torch.Tensor | None], squares) -> list[float]:
    """``norms_into``'s values where not every tensor is the kernel's."""
    values = [math.nan] * len(tensors)
    kernel = [i for i, t in enumerate(tensors) if squares is not None and _kernel_takes(t)]
    if kernel:
        found = np.empty(len(kernel))
        squares(found, [tensors[i] for i in kernel])  # (each one it takes)
        for i, value in zip(kernel, np.sqrt(found).tolist(), strict=True):
            values[i] = value
    taken = set(kernel)
    small = [i for i, t in enumerate(tensors) if t is not None and i not in taken
             and t.numel() <= FLOAT64_MAX]
    if small:
        found = compat.foreach_norm([tensors[i] for i in small], torch.float64)
        for i, value in zip(small, found, strict=True):
            values[i] = value.item()
    for i, t in enumerate(tensors):
        if t is not None and i not in taken and t.numel() > FLOAT64_MAX:
            values[i] = chunked_norm(t)
    return values


def _squares_kernel():
    """``engines.squares.squares_into`` (None without numba, or with ``USE_KERNELS`` off): the
    sums of squares of a list of contiguous float32 CPU tensors, else False."""
    return optional_kernel("squares", "squares_into")


def _kernel_takes(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is the kernel's: a contiguous float32 CPU tensor (as ``squares_into``
    checks)."""
    return t is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()


@torch.no_grad()
def chunked_norm(t: torch.Tensor) -> float:
    """The 2-norm of ``t`` from the norms of its ``CHUNK``-entry pieces (the last may be
    shorter), each accumulated in float32 (half precision too; float64 for float64), their
    squares summed in float64; taken again in float64 where too small (or not finite) to be
    trusted."""
    flat = t.reshape(-1).contiguous()  # (a strided view's rows are summed one by one)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    whole = flat.numel() - flat.numel() % CHUNK
    pieces = [torch.linalg.vector_norm(rows, dim=1, dtype=dtype)
              for rows in flat[:whole].view(-1, CHUNK).split(BLOCK_ROWS)]
    pieces.append(torch.linalg.vector_norm(flat[whole:], dtype=dtype).reshape(1))
    norm = torch.linalg.vector_norm(torch.cat(pieces), dtype=torch.float64).item()
    if TRUSTED_NORM * math.sqrt(flat.numel()) <= norm < math.inf:
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
