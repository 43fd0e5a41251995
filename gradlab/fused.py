"""Numba kernels that fold the recorder's statistics into passes the CPU step makes anyway.

A recorded step must read every weight and gradient once for their norms: on the tutorial's net
that pass alone (1.1 MB) costs ~5 % of a CPU step in eager PyTorch, more than the whole budget for
recording. Plain SGD reads exactly those tensors to update the weights, so ``sgd_step_norms``
takes the squared norms in the same loop that applies the update (float32 partial sums per
2,048-float tile, added up in float64): a recorded step's update costs about what an unrecorded
one's does. The update is ``w + (-lr) * g`` contracted to a fused multiply-add, the same rounding
as ``Tensor.add_(g, alpha=-lr)`` (ATen's vectorised ``fmadd``); the tests check the two bit for
bit, so recording cannot change training.

``activation_stats`` takes f', the saturated count and the positive count per unit in one pass
over the hidden outputs of several recorded steps, for the activations whose f' is a function of
their output (sigmoid, tanh, the relu family, ELU); the others keep ``record.activation_stats``.

CPU only. Numba compiles each kernel on its first call and caches the machine code beside this
file (or in ``NUMBA_CACHE_DIR``), so a later process loads it in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# reassoc: sums may be vectorised (split into partial sums); contract: a * b + c is one fma,
# as in ATen's vectorised add with alpha. No nnan/ninf: an inf or nan gradient must show.
_FLAGS = {"reassoc", "contract"}
TILE = 2048  # floats summed in float32 before they are added to a float64 total

# activation codes of ``activation_stats`` (f' as a function of the output a = f(z))
SIGMOID, TANH, RELU, LEAKY_RELU, ELU = range(5)
CODES = {"sigmoid": SIGMOID, "tanh": TANH, "relu": RELU, "leaky_relu": LEAKY_RELU, "elu": ELU}


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def _sum_squares(x):
    total = np.float32(0.0)
    for i in range(x.shape[0]):  # range from 0: numba then knows i >= 0 and vectorises
        total += x[i] * x[i]
    return total


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def sgd_step(params, grads, neg_lr):
    """``params += neg_lr * grads``: an unrecorded step's update, the same rounding as
    ``Tensor.add_(grads, alpha=-lr)`` and as ``sgd_step_norms``."""
    for i in range(params.shape[0]):
        params[i] = params[i] + neg_lr * grads[i]


@njit(fastmath=_FLAGS, nogil=True, cache=True)
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
        out: 1-d float32 array of squared norms.
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
            tg = np.float32(0.0)
            for i in range(wt.shape[0]):
                wi = wt[i]
                gi = gt[i]
                tw += wi * wi
                tg += gi * gi
                wt[i] = wi + neg_lr * gi
            sw += tw
            sg += tg
        if blocks[k, 2] >= 0:
            out[blocks[k, 2]] = sw
        if blocks[k, 3] >= 0:
            out[blocks[k, 3]] = sg
    for k in range(delta_blocks.shape[0]):
        d = deltas[delta_blocks[k, 0]:delta_blocks[k, 1]]
        total = 0.0
        for start in range(0, d.shape[0], TILE):
            total += _sum_squares(d[start:start + TILE])
        out[delta_blocks[k, 2]] = total


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def activation_stats(chunk, row_stride, rows, members, batch, bounds, code, threshold, slope,
                     out, first_row):
    """Per recorded step, member and hidden layer: the sum of f', the saturated count (f' below
    ``threshold``) and the dead count (units with no positive output in the batch).

    Args:
        chunk: 1-d float32 storage; step r, member m, example b holds the hidden outputs of all
            layers side by side at ``r * row_stride + (m * batch + b) * units``.
        bounds: (layers + 1,) int64 unit offsets of the layers (``bounds[-1]`` = units).
        code: the activation (``CODES``); slope: leaky_relu's negative slope.
        out: (steps, members, >= layers, 3) float32 array; rows ``first_row …`` are written.
    """
    layers = bounds.shape[0] - 1
    units = bounds[layers]
    fsum = np.zeros(units, np.float32)
    low = np.zeros(units, np.float32)
    positive = np.zeros(units, np.float32)
    for r in range(rows):
        for m in range(members):
            fsum[:] = 0.0
            low[:] = 0.0
            positive[:] = 0.0
            for b in range(batch):
                base = r * row_stride + (m * batch + b) * units
                a = chunk[base:base + units]
                if code == SIGMOID:
                    for j in range(units):
                        d = a[j] - a[j] * a[j]
                        fsum[j] += d
                        low[j] += np.float32(1.0) if d < threshold else np.float32(0.0)
                elif code == TANH:
                    for j in range(units):
                        d = np.float32(1.0) - a[j] * a[j]
                        fsum[j] += d
                        low[j] += np.float32(1.0) if d < threshold else np.float32(0.0)
                else:
                    for j in range(units):
                        p = np.float32(1.0) if a[j] > 0 else np.float32(0.0)
                        positive[j] += p
                        if code == RELU:
                            fsum[j] += p
                        elif code == LEAKY_RELU:
                            fsum[j] += p + (np.float32(1.0) - p) * slope
                        else:  # ELU: f' = min(a + 1, 1)
                            fsum[j] += min(a[j] + np.float32(1.0), np.float32(1.0))
            for layer in range(layers):
                lo, hi = bounds[layer], bounds[layer + 1]
                dead = 0.0
                for j in range(lo, hi):
                    if positive[j] == 0:
                        dead += 1.0
                out[first_row + r, m, layer, 0] = fsum[lo:hi].sum()
                out[first_row + r, m, layer, 1] = low[lo:hi].sum()
                out[first_row + r, m, layer, 2] = dead


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def record_step(params, grads, neg_lr, blocks, deltas, delta_blocks, norms, act, row, hidden,
                members, batch, bounds, code, threshold, slope):
    """A recorded step's SGD update with every norm (``sgd_step_norms``, into ``norms[row]``),
    then, when ``code`` is not -1, the f' statistics of the hidden outputs at the start of
    ``hidden`` (``activation_stats`` of one step, into ``act[row]``): one call, one dispatch."""
    sgd_step_norms(params, grads, neg_lr, blocks, deltas, delta_blocks, norms[row])
    if code >= 0:
        activation_stats(hidden, 0, 1, members, batch, bounds, code, threshold, slope, act, row)


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def cross_entropy(logits, labels, members, batch, classes, losses, deltas, delta_at):
    """Softmax cross-entropy of each member's batch: its mean loss into ``losses[m]`` and
    dL/dlogits = (softmax - onehot) / batch into ``deltas`` at ``delta_at[m] + b * classes``.

    The seven small tensor ops this replaces (log_softmax, gather, mean, exp, scatter_add, ...)
    cost ~40 µs a step on the tutorial's net; this pass ~2 µs. Same formulas, float32 (the loss
    summed in float64); an inf or nan logit makes the loss nan, as it does in PyTorch.
    """
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


@njit(fastmath=_FLAGS, nogil=True, cache=True)
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


@njit(fastmath=_FLAGS, nogil=True, cache=True)
def head(hidden, h_at, h_stride, width, params, w_at, b_at, classes, labels, members, batch,
         logits, losses, deltas, d_at, grads, dh, code, slope, prev_at):
    """The last (classifier) layer's whole step for each member m, in one pass:

    * logits = b + h W^T (h: example b's row at ``hidden[h_at[m] + b * h_stride:]``, ``width``
      floats; W (classes, width) and b at ``params[w_at[m]:]``, ``params[b_at[m]:]``), written
      at ``logits[(m * batch + b) * classes:]``;
    * the softmax cross-entropy: mean loss into ``losses[m]``, dL/dlogits into ``deltas`` at
      ``d_at[m]`` (as ``cross_entropy``);
    * gW = delta^T h and gb = sum of delta at the same offsets in ``grads`` as W and b in
      ``params``;
    * dL/dh = delta W into ``dh[(m * batch + b) * width:]``, for the layer below's backward;
      or, when ``code`` is not -1 (h is the output of that activation, ``CODES``), that
      layer's dL/dz itself, into ``deltas`` at ``prev_at[m] + b * width``.

    With 10 classes these are ~0.2 MFLOP each, where a tensor op's own cost is most of the time;
    PyTorch would take five ops (~35 µs a step on the tutorial's net), this pass ~10 µs.
    """
    scale = np.float32(1.0 / batch)
    for m in range(members):
        W = params[w_at[m]:w_at[m] + classes * width]
        gW = grads[w_at[m]:w_at[m] + classes * width]
        gb = grads[b_at[m]:b_at[m] + classes]
        gW[:] = 0
        gb[:] = 0
        total = 0.0
        for b in range(batch):
            h = hidden[h_at[m] + b * h_stride:h_at[m] + b * h_stride + width]
            out = logits[(m * batch + b) * classes:(m * batch + b + 1) * classes]
            for c in range(classes):
                w = W[c * width:(c + 1) * width]
                s = np.float32(0.0)
                for j in range(width):
                    s += h[j] * w[j]
                out[c] = params[b_at[m] + c] + s
            top = out[0]
            for c in range(1, classes):
                top = max(top, out[c])
            s = np.float32(0.0)
            for c in range(classes):
                s += np.exp(out[c] - top)
            lse = top + np.log(s)
            y = labels[m * batch + b]
            total += lse - out[y]
            delta = deltas[d_at[m] + b * classes:d_at[m] + (b + 1) * classes]
            g = dh[(m * batch + b) * width:(m * batch + b + 1) * width]
            g[:] = 0
            for c in range(classes):
                p = np.exp(out[c] - lse)
                d = (p - np.float32(1.0) if c == y else p) * scale
                delta[c] = d
                gb[c] += d
                w = W[c * width:(c + 1) * width]
                gw = gW[c * width:(c + 1) * width]
                for j in range(width):
                    gw[j] += d * h[j]
                    g[j] += d * w[j]
            if code >= 0:
                below = deltas[prev_at[m] + b * width:prev_at[m] + (b + 1) * width]
                for j in range(width):
                    below[j] = _backward_from_output(g[j], h[j], code, slope)
        losses[m] = total / batch
