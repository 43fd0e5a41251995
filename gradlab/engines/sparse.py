"""The first layer's two products over the nonzeros of its input (numba, CPU, float32).

About four fifths of MNIST's pixels are exactly 0 (background), and they stay 0 after ``ToTensor``
scales them. The first layer's forward product ``x W^T`` and its weight gradient ``delta^T x``
(the largest products of a tutorial-sized net, whose first layer holds 74 % of its weights) skip
them here: the nonzero pixels of each pair of examples are listed once per step (``nonzeros``),
then

* ``forward``: ``z[b] = bias + sum over b's nonzero pixels p of x[b, p] W^T[p]``, two examples
  at a time over the union of their pixels, so that each weight row loaded serves both;
* ``weight_grad``: ``gW^T[p] = sum over the examples b where pixel p is nonzero of x[b, p]
  delta[b]``, from the same nonzeros listed by pixel (``by_column``).

The weights are stored transposed (input-major), so a pixel's weights are one contiguous row; both
kernels hold 128 floats in registers (``gradlab.simd``) while they walk a list. On MNIST they take a
fraction of the time of MKL's dense products (``benchmarks/RESULTS.md``); listing the nonzeros both
ways is done in the thread that gathers the batches. The sums equal the dense products' up to float
rounding (the additions come in another order).

Arrays are 1-d float32 (or int64) with explicit offsets, so one call serves every member of a
stacked engine and any row stride of the output.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .fused import bias_grad
from .simd import (
    fma,
    load,
    load_first,
    nonzero_mask,
    splat,
    store,
    store_first,
    trailing_zeros,
    zeros,
)

# Below this fraction of nonzero inputs the sparse products win: their cost grows with the
# fraction, the dense products' does not (the crossing measured at batch 64 with 128 outputs:
# ``benchmarks/RESULTS.md``).
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
def _sum_pairs(keys, first, second, lo, hi, src, base, stride, init, init_at, dst, dst_at,
               dst2_at, width):
    """``_sum_rows`` for two rows at once over the union of their keys (``first`` and ``second``
    their values, 0 where a row has none): each weight row loaded feeds both, 128 floats of each
    at a time, then 16. Where a value is 0 its term adds 0, so each sum is ``_sum_rows``'s,
    bit for bit, for finite weights."""
    j = 0
    while j + 128 <= width:
        a0 = c0 = load(init, init_at + j)
        a1 = c1 = load(init, init_at + j + 16)
        a2 = c2 = load(init, init_at + j + 32)
        a3 = c3 = load(init, init_at + j + 48)
        a4 = c4 = load(init, init_at + j + 64)
        a5 = c5 = load(init, init_at + j + 80)
        a6 = c6 = load(init, init_at + j + 96)
        a7 = c7 = load(init, init_at + j + 112)
        for k in range(lo, hi):
            u = splat(first[k])
            v = splat(second[k])
            s = base + keys[k] * stride + j
            w = load(src, s)
            a0, c0 = fma(u, w, a0), fma(v, w, c0)
            w = load(src, s + 16)
            a1, c1 = fma(u, w, a1), fma(v, w, c1)
            w = load(src, s + 32)
            a2, c2 = fma(u, w, a2), fma(v, w, c2)
            w = load(src, s + 48)
            a3, c3 = fma(u, w, a3), fma(v, w, c3)
            w = load(src, s + 64)
            a4, c4 = fma(u, w, a4), fma(v, w, c4)
            w = load(src, s + 80)
            a5, c5 = fma(u, w, a5), fma(v, w, c5)
            w = load(src, s + 96)
            a6, c6 = fma(u, w, a6), fma(v, w, c6)
            w = load(src, s + 112)
            a7, c7 = fma(u, w, a7), fma(v, w, c7)
        for d, x0, x1, x2, x3, x4, x5, x6, x7 in ((dst_at + j, a0, a1, a2, a3, a4, a5, a6, a7),
                                                  (dst2_at + j, c0, c1, c2, c3, c4, c5, c6, c7)):
            store(dst, d, x0)
            store(dst, d + 16, x1)
            store(dst, d + 32, x2)
            store(dst, d + 48, x3)
            store(dst, d + 64, x4)
            store(dst, d + 80, x5)
            store(dst, d + 96, x6)
            store(dst, d + 112, x7)
        j += 128
    while j < width:
        n = min(16, width - j)
        a0 = c0 = load_first(init, init_at + j, n)
        for k in range(lo, hi):
            w = load_first(src, base + keys[k] * stride + j, n)
            a0, c0 = fma(splat(first[k]), w, a0), fma(splat(second[k]), w, c0)
        store_first(dst, dst_at + j, n, a0)
        store_first(dst, dst2_at + j, n, c0)
        j += 16


@njit(nogil=True, cache=True)
def nonzeros(x, segment_start, features, pair_start, keys, first, second):
    """List the nonzeros of x (1-d, rows of ``features``) two rows at a time: the rows of
    segment g, [segment_start[g], segment_start[g + 1]), are taken in pairs (an odd one last,
    alone), numbered through the segments in order. Pair k's entries, at ``pair_start[k] :
    pair_start[k + 1]``, are the features where either row is nonzero, in feature order
    (``keys``), with the first row's values (``first``) and the second's (``second``; 0 where
    it is 0 or absent).

    Returns how many entries there are, or -1 if ``keys``, ``first`` and ``second`` (of equal
    length) cannot hold them all (as many as there are pairs times features always can).
    """
    capacity = keys.shape[0]
    n = 0
    k = 0
    for g in range(segment_start.shape[0] - 1):
        for q in range(segment_start[g], segment_start[g + 1], 2):
            pair_start[k] = n
            k += 1
            if n + features > capacity:
                return -1
            a = q * features
            two = q + 1 < segment_start[g + 1]
            b = a + features if two else a  # alone: its own row, values dropped below
            p0 = 0
            while p0 + 16 <= features:  # the set bits of 16 features' nonzero masks
                mask = nonzero_mask(x, a + p0)
                if two:
                    mask |= nonzero_mask(x, b + p0)
                while mask != 0:
                    p = p0 + np.int64(trailing_zeros(mask))
                    keys[n] = p
                    first[n] = x[a + p]
                    second[n] = x[b + p] if two else np.float32(0.0)
                    n += 1
                    mask &= mask - np.uint64(1)
                p0 += 16
            for p in range(p0, features):
                if x[a + p] != 0 or (two and x[b + p] != 0):
                    keys[n] = p
                    first[n] = x[a + p]
                    second[n] = x[b + p] if two else np.float32(0.0)
                    n += 1
    pair_start[k] = n
    return n


@njit(nogil=True, cache=True)
def by_column(pair_start, keys, first, second, segment_start, features, column_start,
              column_rows, column_values):
    """The same nonzeros (listed by ``nonzeros`` with these segments) listed by column within
    each segment: segment g's column p lists, at ``column_start[c] : column_start[c + 1]``
    with c = g * features + p, the rows (counted from the segment's first) whose feature p is
    nonzero, in row order (``column_rows``), and those values (``column_values``).
    ``column_start`` needs segments * features + 1 entries, the other two as many as
    ``keys``."""
    segments = segment_start.shape[0] - 1
    columns = segments * features
    column_start[:columns + 1] = 0
    k = 0
    for g in range(segments):  # counts, one place to the right
        c = g * features + 1
        for _ in range(segment_start[g], segment_start[g + 1], 2):
            for e in range(pair_start[k], pair_start[k + 1]):
                column_start[c + keys[e]] += (first[e] != 0) + (second[e] != 0)
            k += 1
    for c in range(columns):
        column_start[c + 1] += column_start[c]
    # column_start[c] walks to where column c + 1 starts. A zero value is written to the last
    # place, past every nonzero (there is one when some value is zero), instead of branching:
    # whether a value of a pair is zero is a coin toss the branch predictor loses
    spare = column_rows.shape[0] - 1
    k = 0
    for g in range(segments):
        c = g * features
        for q in range(segment_start[g], segment_start[g + 1], 2):
            r = q - segment_start[g]
            for e in range(pair_start[k], pair_start[k + 1]):
                o = column_start[c + keys[e]]
                u, v = first[e], second[e]
                at = o if u != 0 else spare
                column_rows[at] = r
                column_values[at] = u
                o += u != 0
                at = o if v != 0 else spare
                column_rows[at] = r + 1
                column_values[at] = v
                o += v != 0
                column_start[c + keys[e]] = o
            k += 1
    for c in range(columns, 0, -1):
        column_start[c] = column_start[c - 1]
    column_start[0] = 0


@njit(nogil=True, cache=True)
def forward(pair_start, keys, first, second, first_pair, members, batch, params, weight_at,
            bias_at, width, z, z_at, z_stride):
    """``z = bias + x W^T`` for each member m, whose batch of x is listed in the pairs from
    ``first_pair + m * ceil(batch / 2)`` on (``nonzeros``): W^T (features, width) at
    ``params[weight_at[m]:]``, its bias at ``params[bias_at[m]:]``, example b's output at
    ``z[z_at[m] + b * z_stride:]``."""
    pairs = (batch + 1) // 2
    for m in range(members):
        for i in range(pairs):
            k = first_pair + m * pairs + i
            out = z_at[m] + 2 * i * z_stride
            if 2 * i + 1 < batch:
                _sum_pairs(keys, first, second, pair_start[k], pair_start[k + 1], params,
                           weight_at[m], width, params, bias_at[m], z, out, out + z_stride,
                           width)
            else:  # an odd last example: alone
                _sum_rows(keys, first, pair_start[k], pair_start[k + 1], params, weight_at[m],
                          width, params, bias_at[m], z, out, width)


@njit(nogil=True, cache=True)
def weight_grad(column_start, column_rows, column_values, members, batch, features, deltas,
                delta_at, width, grads, grad_at, bias_at):
    """``gW^T = x^T delta`` and ``gb = sum of delta over the batch`` for each member m, from x's
    nonzeros listed by column (``by_column``, member m's batch = segment m): delta (batch,
    width) at ``deltas[delta_at[m]:]``, gW^T (features, width) and gb written whole at
    ``grads[grad_at[m]:]`` and ``grads[bias_at[m]:]``. Each pixel's gradient row is summed in
    registers over the examples where it is nonzero and stored once (the deltas, 32 KB at
    batch 64 and width 128, stay in the core's first-level cache): 128 columns at a time, then
    16 (inline: a helper called per pixel, as ``forward`` calls ``_sum_rows`` per row, costs
    more here, a pixel's list being short)."""
    wide = width // 128 * 128
    for m in range(members):
        for j in range(0, wide, 128):
            for p in range(features):
                c = m * features + p
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zeros()
                for k in range(column_start[c], column_start[c + 1]):
                    v = splat(column_values[k])
                    s = delta_at[m] + column_rows[k] * width + j
                    a0 = fma(v, load(deltas, s), a0)
                    a1 = fma(v, load(deltas, s + 16), a1)
                    a2 = fma(v, load(deltas, s + 32), a2)
                    a3 = fma(v, load(deltas, s + 48), a3)
                    a4 = fma(v, load(deltas, s + 64), a4)
                    a5 = fma(v, load(deltas, s + 80), a5)
                    a6 = fma(v, load(deltas, s + 96), a6)
                    a7 = fma(v, load(deltas, s + 112), a7)
                o = grad_at[m] + p * width + j
                store(grads, o, a0)
                store(grads, o + 16, a1)
                store(grads, o + 32, a2)
                store(grads, o + 48, a3)
                store(grads, o + 64, a4)
                store(grads, o + 80, a5)
                store(grads, o + 96, a6)
                store(grads, o + 112, a7)
        j = wide
        while j < width:  # then 16 columns at a time, the last time fewer
            rest = min(16, width - j)
            for p in range(features):
                c = m * features + p
                a0 = zeros()
                for k in range(column_start[c], column_start[c + 1]):
                    s = delta_at[m] + column_rows[k] * width + j
                    a0 = fma(splat(column_values[k]), load_first(deltas, s, rest), a0)
                store_first(grads, grad_at[m] + p * width + j, rest, a0)
            j += 16
        bias_grad(deltas, delta_at[m], batch, width, grads, bias_at[m])


def buffers(rows: int, features: int, density: float = 1.0, segments: int = 1
            ) -> dict[str, np.ndarray]:
    """Buffers for ``nonzeros`` over ``rows`` rows, sized for a fraction ``density`` of
    nonzeros (with a margin; ``list_nonzeros`` grows them when that is short), and for
    ``by_column`` over ``segments`` segments."""
    entries = rows * features if density >= 0.5 else int(rows * features * (2 * density + 0.02))
    entries = max(entries, features)
    return dict(pair_start=np.zeros(rows // 2 + segments + 1, np.int64),
                keys=np.zeros(entries, np.int32), first=np.zeros(entries, np.float32),
                second=np.zeros(entries, np.float32),
                column_start=np.zeros(segments * features + 1, np.int64),
                column_rows=np.zeros(entries, np.int32),
                column_values=np.zeros(entries, np.float32))


def list_nonzeros(x: np.ndarray, features: int, lists: dict, segment_start: np.ndarray,
                  columns: bool = True, density: float = 1.0) -> dict:
    """``nonzeros`` of x's rows in the segments ``segment_start`` (int64) into ``lists`` (from
    ``buffers``), or into new buffers when those are too small (sized for ``density``, or
    whole if that is short too), and ``by_column`` too if ``columns``; returns the buffers
    used."""
    rows, segments = int(segment_start[-1]), len(segment_start) - 1
    if len(lists["pair_start"]) < rows // 2 + segments + 1:
        lists = buffers(rows, features, density, segments)
    if nonzeros(x, segment_start, features, lists["pair_start"], lists["keys"], lists["first"],
                lists["second"]) < 0:
        lists = buffers(rows, features, 1.0, segments)
        nonzeros(x, segment_start, features, lists["pair_start"], lists["keys"],
                 lists["first"], lists["second"])
    if columns:
        if len(lists["column_start"]) < segments * features + 1:
            lists["column_start"] = np.zeros(segments * features + 1, np.int64)
        by_column(lists["pair_start"], lists["keys"], lists["first"], lists["second"],
                  segment_start, features, lists["column_start"], lists["column_rows"],
                  lists["column_values"])
    return lists
