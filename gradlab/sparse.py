"""The first layer's two products over the nonzeros of its input (numba, CPU, float32).

About four fifths of MNIST's pixels are exactly 0 (background), and they stay 0 after ``ToTensor``
scales them. The first layer's forward product ``x W^T`` and its weight gradient ``delta^T x``
(the largest products of a tutorial-sized net, whose first layer holds 74 % of its weights) skip
them here: each example's nonzero pixels are listed once per step (``nonzeros``), then

* ``forward``: ``z[b] = bias + sum over b's nonzero pixels p of x[b, p] W^T[p]``;
* ``weight_grad``: ``gW^T[p] += x[b, p] delta[b]`` for each example b and its nonzero pixels p.

The weights are stored transposed (input-major), so a pixel's weights are one contiguous row;
both kernels hold 128 floats in registers (``gradlab.simd``) while they walk a row list. On MNIST
at batch 64 the two take about 40 % of what the dense products take. The sums equal the dense
products' up to float rounding (the additions come in another order).

Arrays are 1-d float32 (or int64) with explicit offsets, so one call serves every member of a
stacked engine and any row stride of the output.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import fma, load, load_first, nonzero_mask, splat, store, store_first, trailing_zeros

# Below this fraction of nonzero inputs the sparse products win (measured at batch 64 with 128
# outputs: dense ~150 µs a product, sparse ~300 µs times the fraction, plus ~10 µs of listing).
MAX_DENSITY = 0.35


@njit(nogil=True, cache=True)
def _sum_rows(keys, values, lo, hi, src, base, stride, init, init_at, dst, dst_at, width):
    """``dst[dst_at + j] = init[init_at + j] + sum_k values[k] * src[base + keys[k] * stride + j]``
    for k in [lo, hi) and j < width: eight vectors (128 floats) at a time, then one, then the
    rest in part of one."""
    j = 0
    while j + 128 <= width:
        a0 = load(init, init_at + j)
        a1 = load(init, init_at + j + 16)
        a2 = load(init, init_at + j + 32)
        a3 = load(init, init_at + j + 48)
        a4 = load(init, init_at + j + 64)
        a5 = load(init, init_at + j + 80)
        a6 = load(init, init_at + j + 96)
        a7 = load(init, init_at + j + 112)
        for k in range(lo, hi):
            v = splat(values[k])
            s = base + keys[k] * stride + j
            a0 = fma(v, load(src, s), a0)
            a1 = fma(v, load(src, s + 16), a1)
            a2 = fma(v, load(src, s + 32), a2)
            a3 = fma(v, load(src, s + 48), a3)
            a4 = fma(v, load(src, s + 64), a4)
            a5 = fma(v, load(src, s + 80), a5)
            a6 = fma(v, load(src, s + 96), a6)
            a7 = fma(v, load(src, s + 112), a7)
        d = dst_at + j
        store(dst, d, a0)
        store(dst, d + 16, a1)
        store(dst, d + 32, a2)
        store(dst, d + 48, a3)
        store(dst, d + 64, a4)
        store(dst, d + 80, a5)
        store(dst, d + 96, a6)
        store(dst, d + 112, a7)
        j += 128
    while j + 16 <= width:
        a0 = load(init, init_at + j)
        for k in range(lo, hi):
            a0 = fma(splat(values[k]), load(src, base + keys[k] * stride + j), a0)
        store(dst, dst_at + j, a0)
        j += 16
    rest = width - j
    if rest > 0:
        a0 = load_first(init, init_at + j, rest)
        for k in range(lo, hi):
            a0 = fma(splat(values[k]), load_first(src, base + keys[k] * stride + j, rest), a0)
        store_first(dst, dst_at + j, rest, a0)


@njit(nogil=True, cache=True)
def _add_rows(keys, values, lo, hi, src, src_at, dst, base, width):
    """``dst[base + keys[k] * width + j] += values[k] * src[src_at + j]`` for k in [lo, hi) and
    j < width, src's 128 floats at a time held in registers."""
    j = 0
    while j + 128 <= width:
        s = src_at + j
        d0 = load(src, s)
        d1 = load(src, s + 16)
        d2 = load(src, s + 32)
        d3 = load(src, s + 48)
        d4 = load(src, s + 64)
        d5 = load(src, s + 80)
        d6 = load(src, s + 96)
        d7 = load(src, s + 112)
        for k in range(lo, hi):
            v = splat(values[k])
            o = base + keys[k] * width + j
            store(dst, o, fma(v, d0, load(dst, o)))
            store(dst, o + 16, fma(v, d1, load(dst, o + 16)))
            store(dst, o + 32, fma(v, d2, load(dst, o + 32)))
            store(dst, o + 48, fma(v, d3, load(dst, o + 48)))
            store(dst, o + 64, fma(v, d4, load(dst, o + 64)))
            store(dst, o + 80, fma(v, d5, load(dst, o + 80)))
            store(dst, o + 96, fma(v, d6, load(dst, o + 96)))
            store(dst, o + 112, fma(v, d7, load(dst, o + 112)))
        j += 128
    while j + 16 <= width:
        d0 = load(src, src_at + j)
        for k in range(lo, hi):
            o = base + keys[k] * width + j
            store(dst, o, fma(splat(values[k]), d0, load(dst, o)))
        j += 16
    rest = width - j
    if rest > 0:
        d0 = load_first(src, src_at + j, rest)
        for k in range(lo, hi):
            o = base + keys[k] * width + j
            store_first(dst, o, rest, fma(splat(values[k]), d0, load_first(dst, o, rest)))


@njit(nogil=True, cache=True)
def nonzeros(x, rows, features, row_start, keys, values):
    """List the nonzeros of x (1-d: ``rows`` rows of ``features``) row by row: row q's features
    ``keys`` and values ``values`` are at ``row_start[q] : row_start[q + 1]``, in feature order.

    Returns how many there are, or -1 if ``keys`` and ``values`` (of equal length) cannot hold
    them all (``rows * features`` entries always can).
    """
    capacity = keys.shape[0]
    n = 0
    for q in range(rows):
        row_start[q] = n
        base = q * features
        if n + features > capacity and capacity < rows * features:
            return -1
        p0 = 0
        while p0 + 16 <= features:  # the set bits of each 16 features' nonzero mask
            mask = nonzero_mask(x, base + p0)
            while mask != 0:
                p = p0 + np.int64(trailing_zeros(mask))
                keys[n] = p
                values[n] = x[base + p]
                n += 1
                mask &= mask - np.uint64(1)
            p0 += 16
        for p in range(p0, features):
            if x[base + p] != 0:
                keys[n] = p
                values[n] = x[base + p]
                n += 1
    row_start[rows] = n
    return n


@njit(nogil=True, cache=True)
def forward(row_start, keys, values, members, batch, params, weight_at, bias_at, width, z,
            z_at, z_stride):
    """``z = bias + x W^T`` for each member m: W^T (features, width) at ``params[weight_at[m]:]``,
    its bias at ``params[bias_at[m]:]``, example b's output at ``z[z_at[m] + b * z_stride:]``."""
    for m in range(members):
        for b in range(batch):
            q = m * batch + b
            _sum_rows(keys, values, row_start[q], row_start[q + 1], params, weight_at[m], width,
                      params, bias_at[m], z, z_at[m] + b * z_stride, width)


@njit(nogil=True, cache=True)
def weight_grad(row_start, keys, values, members, batch, features, deltas, delta_at, width,
                grads, grad_at, bias_at):
    """``gW^T = x^T delta`` and ``gb = sum of delta over the batch`` for each member m: delta
    (batch, width) at ``deltas[delta_at[m]:]``, gW^T (features, width) and gb written whole at
    ``grads[grad_at[m]:]`` and ``grads[bias_at[m]:]``. Example by example, its delta row held
    in registers is added into the rows of its nonzero pixels."""
    for m in range(members):
        grads[grad_at[m]:grad_at[m] + features * width] = 0
        gb = grads[bias_at[m]:bias_at[m] + width]
        gb[:] = 0
        for b in range(batch):
            q = m * batch + b
            _add_rows(keys, values, row_start[q], row_start[q + 1], deltas,
                      delta_at[m] + b * width, grads, grad_at[m], width)
            d = deltas[delta_at[m] + b * width:delta_at[m] + (b + 1) * width]
            for j in range(width):
                gb[j] += d[j]


def buffers(rows: int, features: int, density: float = 1.0) -> dict[str, np.ndarray]:
    """Index and value buffers for ``nonzeros`` over ``rows`` rows, sized for a fraction
    ``density`` of nonzeros (with a margin; ``list_nonzeros`` grows them when that is short)."""
    entries = rows * features if density >= 0.5 else int(rows * features * (2 * density + 0.02))
    return dict(row_start=np.zeros(rows + 1, np.int64), keys=np.zeros(entries, np.int32),
                values=np.zeros(entries, np.float32))


def list_nonzeros(x: np.ndarray, rows: int, features: int, lists: dict) -> dict:
    """``nonzeros`` into ``lists`` (from ``buffers``), or into new full-size buffers when those
    are too small; returns the buffers used."""
    if nonzeros(x, rows, features, lists["row_start"], lists["keys"], lists["values"]) < 0:
        lists = buffers(rows, features)
        nonzeros(x, rows, features, lists["row_start"], lists["keys"], lists["values"])
    return lists
