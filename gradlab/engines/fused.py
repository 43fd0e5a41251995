"""Numba kernels that fold the recorder's statistics into passes the CPU step makes anyway.

A recorded step must read every weight and gradient once for their norms, a pass as large as the
update itself. Plain SGD reads exactly those tensors to update the weights, so ``sgd_step_norms``
takes the squared norms in the same loop that applies the update: a recorded step's update then
costs about what an unrecorded one's does. The update is ``w + (-lr) * g`` contracted to a fused
multiply-add, the same rounding as ``Tensor.add_(g, alpha=-lr)`` (ATen's vectorised ``fmadd``);
the tests check the two bit for bit, so recording cannot change training.

Squared norms are exact down to the smallest positive float32: squares are summed in float32 per
tile of ``TILE`` floats (fast, vectorised), and a tile whose float32 sum is small enough that
squares may have underflowed (or that overflowed) is summed again in float64 (``_tile_squares``).
A vanishing-gradient tool must measure the smallest gradients best.

``activation_stats`` takes f', the saturated count and the positive count per unit in one pass
over the hidden outputs of several recorded steps, for the activations whose f' is a function of
their output (sigmoid, tanh, the relu family, ELU); the others keep ``record.activation_stats``.

The kernels that need a step's shape take it as one ``STEP`` record (``step_spec``), and
``head`` its per-member offsets as ``HEAD_AT`` records, made once per batch size: named fields
instead of a dozen positional integers, at the dispatch cost of one array each.

CPU only. Numba compiles each kernel on its first call and caches the machine code beside this
file (or in ``NUMBA_CACHE_DIR``), so a later process loads it in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .act_kernels import ACTIVATIONS
from .simd import (
    LANES,
    add,
    fma,
    load,
    load_first,
    mul,
    splat,
    store,
    store_first,
    sub,
    total,
    where_positive,
    zeros,
)

# reassoc: sums may be vectorised (split into partial sums); contract: a * b + c is one fma,
# as in ATen's vectorised add with alpha. No nnan/ninf: an inf or nan gradient must show.
FLAGS = {"reassoc", "contract"}
# Floats summed in float32 before they are added to a float64 total. A tile's float32 sum is
# then a few roundings off: the norm of 200,704 equal entries is within 3e-7 of float64 here
# (2048 floats a tile: 9e-7 in sgd_step_norms, whose loop vectorises into fewer partial sums),
# and random entries' within 1e-7, at any size (tests/test_norms.py).
TILE = 512
# A tile's float32 sum of squares at least this large (2**-64) holds every square to float32
# rounding: the squares that underflowed (below 2**-126 each, at most TILE of them) add less
# than 2**-52 of it. Below it, or not finite, the tile is summed again in float64.
SMALL_SUM = np.float32(2.0 ** -64)
INF = np.float32(np.inf)
UP = np.float32(2.0 ** 86)  # see sgd_step_norms
DOWN = 2.0 ** -172  # UP ** -2

# The shape of a step, for the kernels that take it: members, their batch, the width of the
# layer below the last and the classes (``head``), the row stride of the hidden outputs in the
# chunk buffer, the activation's ``CODES`` entry (-1: none), whether ``record_step`` takes the
# f' statistics, leaky_relu's slope, the saturation threshold of f', and -lr.
STEP = np.dtype([("members", np.int64), ("batch", np.int64), ("width", np.int64),
                 ("classes", np.int64), ("row_stride", np.int64), ("code", np.int64),
                 ("record_stats", np.int64), ("slope", np.float32), ("threshold", np.float32),
                 ("neg_lr", np.float32)], align=True)
# Per member, where ``head``'s blocks start in the flat buffer: the last layer's weight and
# bias (and their gradients, at the same offsets in the gradients), its dL/dz, and the layer
# below's dL/dz and bias gradient.
HEAD_AT = np.dtype([("weight", np.int64), ("bias", np.int64), ("delta", np.int64),
                    ("below_delta", np.int64), ("below_bias", np.int64)], align=True)

# activation codes of ``activation_stats`` (f' as a function of the output a = f(z)): the
# ``code`` of each activation of ``act_kernels`` that has one
CODES = {a.name: a.code for a in ACTIVATIONS.values() if a.code is not None}
SIGMOID, TANH, RELU, LEAKY_RELU, ELU = (CODES[name] for name in (
    "sigmoid", "tanh", "relu", "leaky_relu", "elu"))


def step_spec(members: int, batch: int, *, width: int = 0, classes: int = 0,
              row_stride: int = 0, code: int = -1, record_stats: bool = False,
              slope: float = 0.0, threshold: float = 0.0, neg_lr: float = 0.0) -> np.ndarray:
    """A ``STEP`` record (a 1-element array, as the kernels take it)."""
    return np.array([(members, batch, width, classes, row_stride, code, int(record_stats),
                      slope, threshold, neg_lr)], dtype=STEP)


@njit(fastmath=FLAGS, nogil=True, cache=True)
def _sum_squares(x):
    total = np.float32(0.0)
    for i in range(x.shape[0]):  # range from 0: numba then knows i >= 0 and vectorises
        total += x[i] * x[i]
    return total


@njit(fastmath=FLAGS, nogil=True, cache=True)
def _sum_squares64(x):
    total = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        total += v * v
    return total


@njit(fastmath=FLAGS, nogil=True, cache=True)
def _tile_squares(tile, partial):
    """The sum of squares of ``tile`` given its float32 sum ``partial``: that sum where it holds
    every square, else the tile summed again in float64 (see ``SMALL_SUM``)."""
    if partial >= SMALL_SUM and partial < INF:
        return np.float64(partial)
    return _sum_squares64(tile)


@njit(fastmath=FLAGS, nogil=True, cache=True)
def squares(x):
    """The sum of squares of the 1-d float32 array ``x``, exact down to the smallest positive
    float32 (float64, tile by tile)."""
    total = 0.0
    for start in range(0, x.shape[0], TILE):
        tile = x[start:start + TILE]
        total += _tile_squares(tile, _sum_squares(tile))
    return total


@njit(fastmath=FLAGS, nogil=True, cache=True)
def block_squares(buffer, ranges, out):
    """``out[k]`` = the sum of squares of ``buffer[ranges[k, 0]:ranges[k, 1]]`` (float64)
    for each row of ``ranges`` ((k, 2) int64)."""
    for k in range(ranges.shape[0]):
        out[k] = squares(buffer[ranges[k, 0]:ranges[k, 1]])


@njit(fastmath=FLAGS, nogil=True, cache=True)
def sgd_step(params, grads, neg_lr):
    """``params += neg_lr * grads``: an unrecorded step's update, the same rounding as
    ``Tensor.add_(grads, alpha=-lr)`` and as ``sgd_step_norms``."""
    for i in range(params.shape[0]):
        params[i] = params[i] + neg_lr * grads[i]


@njit(fastmath=FLAGS, nogil=True, cache=True)
def sgd_step_norms(params, grads, neg_lr, blocks, deltas, delta_blocks, out):
    """``params += neg_lr * grads`` over each block, taking squared norms on the way.

    Args:
        params, grads: 1-d float32 arrays of one layout (the stacked engine's flat buffer).
        neg_lr: -lr as a float32.
        blocks: (k, 4) int64 rows ``start, stop, weight_out, grad_out``: the block's elements
            and where its parameters' and its gradient's squared norms go in ``out`` (-1: not
            wanted). Elements outside every block are left alone.
        deltas, delta_blocks: a 1-d float32 array and (j, 3) rows ``start, stop, out`` of blocks
            whose squared norms are wanted too (dL/dz).
        out: 1-d float64 array of squared norms, exact down to the smallest positive float32.

    The weights are updated in the same loop, so a tile of them cannot be summed again: their
    squares are also summed scaled by ``UP`` (2**86, which keeps the square of the smallest
    positive float32 normal), and that sum serves a tile whose plain sum is below ``SMALL_SUM``
    (every weight of it is then below 2**-32, so the scaled squares cannot overflow).
    """
    for k in range(blocks.shape[0]):
        w = params[blocks[k, 0]:blocks[k, 1]]
        g = grads[blocks[k, 0]:blocks[k, 1]]
        sw = 0.0
        sg = 0.0
        for start in range(0, w.shape[0], TILE):
            wt = w[start:start + TILE]
            gt = g[start:start + TILE]
            tw = np.float32(0.0)
            scaled = np.float32(0.0)
            tg = np.float32(0.0)
            for i in range(wt.shape[0]):
                wi = wt[i]
                gi = gt[i]
                tw += wi * wi
                up = wi * UP
                scaled += up * up
                tg += gi * gi
                wt[i] = wi + neg_lr * gi
            sw += tw if tw >= SMALL_SUM else scaled * DOWN
            sg += _tile_squares(gt, tg)
        if blocks[k, 2] >= 0:
            out[blocks[k, 2]] = sw
        if blocks[k, 3] >= 0:
            out[blocks[k, 3]] = sg
    for k in range(delta_blocks.shape[0]):
        out[delta_blocks[k, 2]] = squares(deltas[delta_blocks[k, 0]:delta_blocks[k, 1]])


@njit(fastmath=FLAGS, nogil=True, cache=True)
def activation_stats(chunk, row_stride, rows, bounds, step, out, first_row):
    """Per recorded step, member and hidden layer: the sum of f', the saturated count (f' below
    ``threshold``) and the dead count (units with no positive output in the batch).

    Args:
        chunk: 1-d float32 storage; step r, member m, example b holds the hidden outputs of all
            layers side by side at ``r * row_stride + (m * batch + b) * units``.
        bounds: (layers + 1,) int64 unit offsets of the layers (``bounds[-1]`` = units).
        step: a ``STEP`` record: members, batch, code (the activation), threshold, slope.
        out: (steps, members, >= layers, 3) float32 array; rows ``first_row …`` are written.

    16 units at a time, their sums over the batch held in registers (the same additions, in
    example order, as a unit-by-unit loop), then added up per layer.
    """
    s = step[0]
    members, batch, code = s.members, s.batch, s.code
    threshold, slope = s.threshold, s.slope
    layers = bounds.shape[0] - 1
    units = bounds[layers]
    one, none, k, limit = splat(1.0), zeros(), splat(slope), splat(threshold)
    ones = np.ones(LANES, np.float32)
    for r in range(rows):
        for m in range(members):
            base = r * row_stride + m * batch * units
            for layer in range(layers):
                f_total = np.float32(0.0)
                low_total = np.float32(0.0)
                dead = np.float32(0.0)
                j = bounds[layer]
                while j < bounds[layer + 1]:
                    n = min(LANES, bounds[layer + 1] - j)
                    fsum, low, positive = zeros(), zeros(), zeros()
                    for b in range(batch):
                        a = load_first(chunk, base + b * units + j, n)
                        if code == SIGMOID or code == TANH:
                            d = sub(a, mul(a, a)) if code == SIGMOID else sub(one, mul(a, a))
                            fsum = add(fsum, d)
                            low = add(low, where_positive(sub(limit, d), one, none))
                        else:
                            p = where_positive(a, one, none)
                            positive = add(positive, p)
                            if code == RELU:
                                fsum = add(fsum, p)
                            elif code == LEAKY_RELU:
                                fsum = add(fsum, add(p, mul(sub(one, p), k)))
                            else:  # ELU: f' = min(a + 1, 1)
                                fsum = add(fsum, where_positive(a, one, add(a, one)))
                    lanes = load_first(ones, 0, n)  # the lanes of this layer's units
                    f_total += total(mul(fsum, lanes))
                    low_total += total(mul(low, lanes))
                    dead += total(mul(where_positive(positive, none, one), lanes))
                    j += LANES
                out[first_row + r, m, layer, 0] = f_total
                out[first_row + r, m, layer, 1] = low_total
                out[first_row + r, m, layer, 2] = dead if code >= RELU else np.float32(0.0)


@njit(fastmath=FLAGS, nogil=True, cache=True)
def record_step(params, grads, deltas, blocks, delta_blocks, norms, act, row, hidden, bounds,
                step):
    """A recorded step's SGD update with every norm (``sgd_step_norms`` with ``step``'s
    neg_lr, into ``norms[row]``), then, when ``step`` says ``record_stats``, the f' statistics
    of the hidden outputs at the start of ``hidden`` (``activation_stats`` of one step, into
    ``act[row]``): one call, one dispatch."""
    sgd_step_norms(params, grads, step[0].neg_lr, blocks, deltas, delta_blocks, norms[row])
    if step[0].record_stats:
        activation_stats(hidden, 0, 1, bounds, step, act, row)


@njit(fastmath=FLAGS, nogil=True, cache=True)
def cross_entropy(logits, labels, losses, deltas, delta_at, step):
    """Softmax cross-entropy of each member's batch (``step``: members, batch, classes): its
    mean loss into ``losses[m]`` and dL/dlogits = (softmax - onehot) / batch into ``deltas`` at
    ``delta_at[m] + b * classes``.

    One pass instead of seven small tensor ops (log_softmax, gather, mean, exp, scatter_add,
    ...), whose per-op cost dominates at this size. Same formulas, float32 (the loss summed in
    float64); an inf or nan logit makes the loss nan, as it does in PyTorch.
    """
    members, batch, classes = step[0].members, step[0].batch, step[0].classes
    scale = np.float32(1.0 / batch)
    for m in range(members):
        total = 0.0
        for b in range(batch):
            row = (m * batch + b) * classes
            top = logits[row]
            for c in range(1, classes):
                top = max(top, logits[row + c])
            s = np.float32(0.0)
            for c in range(classes):
                s += np.exp(logits[row + c] - top)
            lse = top + np.log(s)
            y = labels[m * batch + b]
            total += lse - logits[row + y]
            at = delta_at[m] + b * classes
            for c in range(classes):
                p = np.exp(logits[row + c] - lse)
                deltas[at + c] = (p - np.float32(1.0) if c == y else p) * scale
        losses[m] = total / batch


@njit(fastmath=FLAGS, nogil=True, cache=True)
def _backward_from_output(g, a, code, slope):
    """dL/dz from dL/da = g and the activation's output a, as PyTorch's backward kernels
    compute it (sigmoid_backward, tanh_backward, threshold_backward, ...)."""
    if code == SIGMOID:
        return g * (np.float32(1.0) - a) * a
    if code == TANH:
        return g * (np.float32(1.0) - a * a)
    if code == RELU:
        return g if a > 0 else np.float32(0.0)
    if code == LEAKY_RELU:
        return g if a > 0 else g * slope
    return g if a > 0 else g * (a + np.float32(1.0))  # ELU, alpha 1, from its output


@njit(fastmath=FLAGS, nogil=True, cache=True)
def _dots4(h, h_at, w, w_at, stride, n, out, out_at):
    """``out[out_at + i] = h[h_at:h_at + n] . w[w_at + i * stride:][:n]`` for i < 4: four dot
    products sharing h's loads, four accumulators in flight."""
    a0 = zeros()
    a1 = zeros()
    a2 = zeros()
    a3 = zeros()
    j = 0
    while j < n:
        k = min(LANES, n - j)
        x = load_first(h, h_at + j, k) if k < LANES else load(h, h_at + j)
        if k < LANES:
            a0 = fma(x, load_first(w, w_at + j, k), a0)
            a1 = fma(x, load_first(w, w_at + stride + j, k), a1)
            a2 = fma(x, load_first(w, w_at + 2 * stride + j, k), a2)
            a3 = fma(x, load_first(w, w_at + 3 * stride + j, k), a3)
        else:
            a0 = fma(x, load(w, w_at + j), a0)
            a1 = fma(x, load(w, w_at + stride + j), a1)
            a2 = fma(x, load(w, w_at + 2 * stride + j), a2)
            a3 = fma(x, load(w, w_at + 3 * stride + j), a3)
        j += LANES
    out[out_at] = total(a0)
    out[out_at + 1] = total(a1)
    out[out_at + 2] = total(a2)
    out[out_at + 3] = total(a3)


@njit(fastmath=FLAGS, nogil=True, cache=True)
def _combine(coef, c_at, c_step, count, src, s_at, s_stride, n, dst, d_at):
    """``dst[d_at:d_at + n] = sum over i < count of coef[c_at + i * c_step] *
    src[s_at + i * s_stride:][:n]``, 64 floats at a time in registers."""
    j = 0
    while j < n:
        a0 = zeros()
        a1 = zeros()
        a2 = zeros()
        a3 = zeros()
        k = min(4 * LANES, n - j)
        for i in range(count):
            v = splat(coef[c_at + i * c_step])
            s = s_at + i * s_stride + j
            if k == 4 * LANES:
                a0 = fma(v, load(src, s), a0)
                a1 = fma(v, load(src, s + 16), a1)
                a2 = fma(v, load(src, s + 32), a2)
                a3 = fma(v, load(src, s + 48), a3)
            else:
                a0 = fma(v, load_first(src, s, min(k, LANES)), a0)
                if k > LANES:
                    a1 = fma(v, load_first(src, s + 16, min(k - 16, LANES)), a1)
                if k > 2 * LANES:
                    a2 = fma(v, load_first(src, s + 32, min(k - 32, LANES)), a2)
                if k > 3 * LANES:
                    a3 = fma(v, load_first(src, s + 48, min(k - 48, LANES)), a3)
        if k == 4 * LANES:
            store(dst, d_at + j, a0)
            store(dst, d_at + j + 16, a1)
            store(dst, d_at + j + 32, a2)
            store(dst, d_at + j + 48, a3)
        else:
            store_first(dst, d_at + j, min(k, LANES), a0)
            if k > LANES:
                store_first(dst, d_at + j + 16, min(k - 16, LANES), a1)
            if k > 2 * LANES:
                store_first(dst, d_at + j + 32, min(k - 32, LANES), a2)
            if k > 3 * LANES:
                store_first(dst, d_at + j + 48, min(k - 48, LANES), a3)
        j += 4 * LANES


@njit(fastmath=FLAGS, nogil=True, cache=True)
def _backward_row(g, g_at, a, a_at, n, code, slope, out, out_at):
    """``out[out_at + j] = _backward_from_output(g[g_at + j], a[a_at + j])`` for j < n, in
    vectors of 16 (the same operations in the same order)."""
    one = splat(1.0)
    zero = zeros()
    k = splat(slope)
    j = 0
    while j < n:
        count = min(LANES, n - j)
        x = load_first(a, a_at + j, count)
        d = load_first(g, g_at + j, count)
        if code == SIGMOID:
            r = mul(mul(d, sub(one, x)), x)
        elif code == TANH:
            r = mul(d, sub(one, mul(x, x)))
        elif code == RELU:
            r = where_positive(x, d, zero)
        elif code == LEAKY_RELU:
            r = where_positive(x, d, mul(d, k))
        else:  # ELU
            r = where_positive(x, d, mul(d, add(x, one)))
        store_first(out, out_at + j, count, r)
        j += LANES


@njit(fastmath=FLAGS, nogil=True, cache=True)
def bias_grad(deltas, at, batch, width, grads, grad_at):
    """``grads[grad_at:][:width]`` = the sum of the ``batch`` rows of dL/dz at ``deltas[at:]``
    (rows of ``width``), added in example order."""
    gb = grads[grad_at:grad_at + width]
    gb[:] = 0
    for b in range(batch):
        d = deltas[at + b * width:at + (b + 1) * width]
        for j in range(width):
            gb[j] += d[j]


@njit(fastmath=FLAGS, nogil=True, cache=True)
def backward(g, a, a_at, out, out_at, n, step):
    """A hidden layer's dL/dz from dL/da and its output a, for each member m and example b:
    dL/da (members, batch, n) contiguous in ``g``, a's row at ``a[a_at[m] + b * row_stride:]``,
    dL/dz's written at ``out[out_at[m] + b * n:]`` (``_backward_row``: the formulas of
    PyTorch's backward kernels, in one call instead of a tensor op). ``step``: members, batch,
    row_stride, code, slope."""
    s = step[0]
    members, batch, a_stride, code, slope = s.members, s.batch, s.row_stride, s.code, s.slope
    for m in range(members):
        for b in range(batch):
            _backward_row(g, (m * batch + b) * n, a, a_at[m] + b * a_stride, n, code, slope,
                          out, out_at[m] + b * n)


@njit(fastmath=FLAGS, nogil=True, cache=True)
def head(hidden, h_at, params, grads, deltas, dh, labels, logits, losses, correct, at, step):
    """The last (classifier) layer's whole step for each member m, in one pass, with ``step``
    (members, batch, width, classes, row_stride, code, slope) and ``at`` (``HEAD_AT`` per
    member):

    * logits = b + h W^T (h: example b's row at ``hidden[h_at[m] + b * row_stride:]``,
      ``width`` floats; W (classes, width) and b at ``params[at[m].weight:]``,
      ``params[at[m].bias:]``), written at ``logits[(m * batch + b) * classes:]``;
    * the softmax cross-entropy: mean loss into ``losses[m]``, dL/dlogits into ``deltas`` at
      ``at[m].delta`` (as ``cross_entropy``); ``correct[m]`` counts the examples whose first
      largest logit (``argmax``'s) is their label;
    * gW = delta^T h and gb = sum of delta at the same offsets in ``grads`` as W and b in
      ``params``;
    * dL/dh = delta W into ``dh[(m * batch + b) * width:]``, for the layer below's backward;
      or, when ``code`` is not -1 (h is the output of that activation, ``CODES``), that
      layer's dL/dz itself, into ``deltas`` at ``at[m].below_delta + b * width``, and its bias
      gradient (their sum over the batch) into ``grads`` at ``at[m].below_bias``.

    With 10 classes these products are tiny, and a tensor op's own cost would be most of their
    time: one pass replaces PyTorch's six ops.
    """
    s = step[0]
    members, batch, width, classes = s.members, s.batch, s.width, s.classes
    h_stride, code, slope = s.row_stride, s.code, s.slope
    scale = np.float32(1.0 / batch)
    row = np.zeros(classes + 3, np.float32)  # the logits' dot products
    for m in range(members):
        w0, b0, d0 = at[m].weight, at[m].bias, at[m].delta
        total_loss = 0.0
        for b in range(batch):  # logits and dL/dlogits, example by example
            h0 = h_at[m] + b * h_stride
            for c in range(0, classes - 3, 4):
                _dots4(hidden, h0, params, w0 + c * width, width, width, row, c)
            for c in range(classes - classes % 4, classes):  # one dot, written 4 times: the
                _dots4(hidden, h0, params, w0 + c * width, 0, width, row, c)  # next overwrite
            out = (m * batch + b) * classes
            for c in range(classes):
                logits[out + c] = params[b0 + c] + row[c]
            top = logits[out]
            predicted = 0
            for c in range(1, classes):
                if logits[out + c] > top:
                    top = logits[out + c]
                    predicted = c
            s = np.float32(0.0)
            for c in range(classes):  # one exp per logit: they are most of this loop's time
                row[c] = np.exp(logits[out + c] - top)
                s += row[c]
            y = labels[m * batch + b]
            total_loss += top + np.log(s) - logits[out + y]
            if predicted == y:
                correct[m] += 1
            for c in range(classes):
                p = row[c] / s  # softmax
                deltas[d0 + b * classes + c] = (p - np.float32(1.0) if c == y else p) * scale
        losses[m] = total_loss / batch
        for c in range(classes):  # gW = delta^T h, gb = sum of delta
            _combine(deltas, d0 + c, classes, batch, hidden, h_at[m], h_stride, width, grads,
                     w0 + c * width)
            gb = np.float32(0.0)
            for b in range(batch):
                gb += deltas[d0 + b * classes + c]
            grads[b0 + c] = gb
        for b in range(batch):  # dL/dh = delta W, then f' of the layer below
            g0 = (m * batch + b) * width
            _combine(deltas, d0 + b * classes, 1, classes, params, w0, width, width, dh, g0)
            if code >= 0:
                _backward_row(dh, g0, hidden, h_at[m] + b * h_stride, width, code, slope,
                              deltas, at[m].below_delta + b * width)
        if code >= 0:
            bias_grad(deltas, at[m].below_delta, batch, width, grads, at[m].below_bias)
