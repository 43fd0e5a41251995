"""f' statistics of a layer's activation: the sum of f', and the counts of saturated and of
dead units, from which ``frames`` makes ``act_grad_mean``, ``saturated_frac`` and ``dead_frac``.

Only float arithmetic, in place where it can be: on the CPU, comparisons that produce bool
tensors (and their sums) are several times slower than a float pass.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys

import numpy as np
import torch

from ..activations import SATURATION, Activation, get

CHUNK_BYTES = 2 << 20  # activations buffered before their stats are taken (and as much scratch)


def optional_kernel(module: str, name: str):
    """``gradlab.engines.<module>.<name>``, a numba kernel, imported on first use (numba takes
    a moment to load); None without numba or with ``gradlab.record.USE_KERNELS`` off."""
    if not sys.modules[__package__].USE_KERNELS:
        return None
    found = _kernel_module(module)
    return getattr(found, name) if found is not None else None


@functools.cache
def _kernel_module(name: str):
    try:
        return importlib.import_module(f"..engines.{name}", __package__)
    except ImportError:  # no numba (gradlab[fast])
        return None


def derivative_into(activation: str, from_output: bool):
    """f' as ``fn(t, out) -> out`` of the activation's output (``from_output``: see the
    registry's ``Activation.from_output``) or input."""
    act = get(activation)
    if from_output:
        return act.from_output
    return lambda z, out: out.copy_(act.derivative(z))


def activation_stats(a: torch.Tensor, derivative, activation: Activation,
                     segments: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Per hidden layer: the sum of f', the number of saturated and of dead units.

    Args:
        a: (..., batch, sum of hidden widths): the hidden layers' outputs (or z, as
            ``derivative`` expects), concatenated along the last axis.
        derivative: ``fn(a, out)`` writing f' into out (see ``derivative_into``).
        activation: the activation's registry entry.
        segments: (sum of hidden widths, hidden layers) 0/1 matrix assigning units to layers.
        work: a scratch tensor of a's shape.

    Returns (..., hidden layers, 3).
    """
    with torch.no_grad():
        fp = derivative(a, work)
        total = fp.sum(-2)
        zeros = torch.zeros_like(total)
        saturated = dead = zeros
        if activation.saturating:
            # f' - t < 0 exactly where f' < t, and lies in (-1, 1) for these activations
            # (0 <= f' <= 1), so its floor is -1 there and 0 elsewhere
            saturated = fp.sub_(SATURATION * activation.max_derivative).floor_().sum(-2).neg_()
        if activation.relu_family:  # dead: no example has z > 0, i.e. f(z) > 0
            # relu's f' is 1 exactly where z > 0, so its sum already counts the positives
            positive = (total if activation.name == "relu"
                        else torch.clamp(a, 0, 1, out=work).ceil_().sum(-2))
            dead = positive.eq(0).to(total.dtype)
        stats = torch.stack([total, saturated, dead], -2)  # (..., 3, units)
        per_layer = stats.view(-1, stats.shape[-1]) @ segments  # one 2-d product
        return per_layer.view(*stats.shape[:-1], -1).transpose(-1, -2)


def call_stats(z: torch.Tensor, act: Activation) -> torch.Tensor:
    """(2,) float32: the sum of f'(z) and the count of saturated entries of one call's z."""
    stats = _kernel_call_stats(z, act)
    if stats is not None:
        return stats
    fp = act.derivative(z)
    saturated = ((fp < SATURATION * act.max_derivative).sum(dtype=torch.float32)
                 if act.saturating else fp.new_zeros((), dtype=torch.float32))
    return torch.stack([fp.sum(dtype=torch.float32), saturated])


def per_unit_sum(t: torch.Tensor, axis: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over everything but the unit axis (``axis``, counted from the end: -1 for features,
    -3 for a Conv2d's channels)."""
    width = t.shape[axis]
    if axis == -1:
        return torch.sum(t.reshape(-1, width), 0, out=out)
    return torch.sum(t.reshape(-1, width, math.prod(t.shape[axis + 1:])), (0, 2), out=out)


@functools.cache
def negative_slope(name: str) -> float:
    """f' of a relu-family activation at negative inputs (0 for relu)."""
    return 0.0 if name == "relu" else get(name).derivative(torch.tensor(-1.0)).item()


def relu_family_stats(counts: np.ndarray, numel: np.ndarray, act: Activation) -> np.ndarray:
    """(rows, 3): sum of f', saturated (none) and dead units of a relu-family layer, from each
    row's per-unit counts of z > 0 (rows, units; NaN where the layer was not called) and its
    elements of z (rows,)."""
    positive = counts.sum(1)
    slope = negative_slope(act.name)
    with np.errstate(invalid="ignore"):
        dead = np.where(np.isnan(positive), np.nan, (counts == 0).sum(1))
    return np.stack([positive * (1 - slope) + slope * numel, np.zeros_like(positive), dead], 1)


def hidden_segments(widths, device=None, dtype=None) -> torch.Tensor:
    """The (sum of widths, layers) 0/1 matrix that sums concatenated units per layer."""
    segments = torch.zeros(sum(widths), len(widths), device=device, dtype=dtype)
    start = 0
    for layer, width in enumerate(widths):
        segments[start:start + width, layer] = 1
        start += width
    return segments


# sigmoid and tanh by the stacked engine's kernel, from the output a = f(z) (f' = a - a**2,
# 1 - a**2): one torch op and one pass, 3x faster than the torch ops below (40 against 118 µs
# for a 64 x 128 z, 53 against 141 µs for 64 x 256; AMD EPYC under load, 1 thread)
_FORWARD = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _kernel_call_stats(z: torch.Tensor, act: Activation) -> torch.Tensor | None:
    """``call_stats`` by ``engines.fused.activation_stats`` where it takes z (a contiguous
    float32 CPU tensor, sigmoid or tanh, numba present), else None. Its sums are over every
    entry, so any layout of the units will do: z is read as rows of its last axis."""
    forward = _FORWARD.get(act.name)
    if (forward is None or z.dtype != torch.float32 or not z.is_cpu or not z.is_contiguous()
            or z.numel() == 0):
        return None
    kernel = optional_kernel("fused", "activation_stats")
    if kernel is None:
        return None
    width = z.shape[-1] if z.dim() else 1
    spec, bounds = _kernel_spec(act.name, z.numel() // width, width)
    out = np.empty((1, 1, 1, 3), np.float32)
    kernel(forward(z).view(-1).numpy(), 0, 1, bounds, spec, out, 0)
    return torch.from_numpy(out[0, 0, 0, :2])


@functools.cache
def _kernel_spec(name: str, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    fused = _kernel_module("fused")
    act = get(name)
    return (fused.step_spec(1, rows, code=fused.CODES[name],
                            threshold=SATURATION * act.max_derivative),
            np.array([0, width], np.int64))
