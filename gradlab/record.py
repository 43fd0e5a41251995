"""``GradientRecorder``: hooks on every ``nn.Linear`` that record per-layer gradient statistics.

The statistics live in device buffers indexed by a host-side counter, so the step loop never waits
for the device; ``flush()`` copies them to the host once, at an epoch end, as tidy rows.

How each column is obtained (DESIGN, "What is recorded"):

* ``grad_output_norm``: a forward hook on each Linear registers a *tensor* hook on its output z,
  which receives dL/dz. (A module full backward hook would break in-place activations that
  overwrite z, and would need the first layer's input to require grad.) A tensor hook registered
  before an in-place op still receives the gradient w.r.t. the value before it.
* ``grad_weight_norm`` / ``grad_bias_norm``: read from ``.grad`` in ``after_backward()``, i.e.
  after accumulation (module backward hooks run before ``.grad`` is filled in) and *before* any
  gradient clipping, so the records show the raw gradient.
* ``act_grad_mean``, ``saturated_frac``, ``dead_frac``: computed from z inside the forward hook,
  before an in-place activation can overwrite it.
* ``update_ratio``: the weights are snapshotted in ``after_backward()`` and differenced in
  ``after_update()``; the ratio is taken to the norm before the update (``weight_norm``).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn

from .models import ACTIVATIONS, linear_layers

COLUMNS = (
    "grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm", "update_ratio",
    "act_grad_mean", "saturated_frac", "dead_frac", "loss",
)
SATURATION = 0.05  # a unit is saturated where f'(z) < SATURATION * max f'
LOG_POINTS_PER_DECADE = 20


def recorded_steps(total_steps: int, log_every: int = 1, log_spaced: bool = False) -> np.ndarray:
    """The steps (0-based, ``< total_steps``) that a schedule records, sorted.

    ``log_every=N`` records steps 0, N, 2N, …; 0 records nothing. ``log_spaced`` records step 0
    and about 20 steps per decade (1, 2, …, 10, 11, 13, …), for long runs.
    """
    if log_every == 0 or total_steps <= 0:
        return np.zeros(0, dtype=np.int64)
    if not log_spaced:
        return np.arange(0, total_steps, log_every, dtype=np.int64)
    n = math.ceil(math.log10(total_steps) * LOG_POINTS_PER_DECADE) + 1
    grid = np.round(10 ** (np.arange(n) / LOG_POINTS_PER_DECADE)).astype(np.int64)
    steps = np.unique(np.concatenate([[0], grid]))
    return steps[steps < total_steps]


class GradientRecorder:
    """Record per-layer gradient statistics of every ``nn.Linear`` of ``model``.

    Use as a context manager (hooks are removed on exit), and per step::

        if rec.begin_step(step):      # before the forward pass
            ...forward, loss.backward()...
            rec.after_backward(loss)  # before clipping and optimizer.step()
            optimizer.step()
            rec.after_update()
        rows = rec.flush()            # at an epoch end: a tidy DataFrame

    Args:
        model: any module; every ``nn.Linear`` in it is recorded, numbered 0… in forward order.
        activation: the activation name that follows each hidden Linear (for f', saturation,
            dead units); the last Linear is taken as the output layer.
        steps: the steps to record (see ``recorded_steps``).
    """

    def __init__(self, model: nn.Module, activation: str, steps: np.ndarray):
        self.linears = linear_layers(model)
        self.activation = ACTIVATIONS[activation]
        self._steps = set(int(s) for s in steps)
        self._handles: list = []
        self._active = False
        self._pending_update = False
        self._recorded: list[int] = []
        self._batch: list[int] = []  # batch size of each recorded row
        self._row = -1
        self._buffers_for(16)

    # -- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> GradientRecorder:
        for index, layer in enumerate(self.linears):
            self._handles.append(layer.register_forward_hook(partial(self._forward_hook, index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    def _forward_hook(self, index: int, module, inputs, z: torch.Tensor) -> None:
        if not self._active:
            return
        if z.requires_grad:
            z.register_hook(partial(self._grad_output_hook, index))
        if index == len(self.linears) - 1:
            return  # the output layer has no activation
        z = z.detach()
        fp = self.activation.derivative(z)
        out = self._act[self._row, index]
        torch.sum(fp, dim=(0, 1), out=out[0])
        if self.activation.saturating:
            threshold = SATURATION * self.activation.max_derivative
            torch.sum(fp < threshold, dim=(0, 1), dtype=out.dtype, out=out[1])
        if self.activation.relu_family:
            torch.sum(z.amax(0) <= 0, dim=0, dtype=out.dtype, out=out[2])
        self._batch[-1] = z.shape[0]

    def _grad_output_hook(self, index: int, grad: torch.Tensor) -> None:
        self._grad_out[index] = grad

    # -- buffers -------------------------------------------------------------------------------
    def _buffers_for(self, rows: int, device: torch.device | None = None) -> None:
        device = device or self.linears[0].weight.device
        n = len(self.linears)
        # norms: grad_output, grad_weight, grad_bias, weight (n each), then the loss
        self._norms = torch.full((rows, 4 * n + 1), math.nan, device=device)
        self._update = torch.full((rows, n), math.nan, device=device)
        # act: sum f'(z), count saturated, count dead
        self._act = torch.full((rows, n, 3), math.nan, device=device)
        self._grad_out: list[torch.Tensor | None] = [None] * n
        self._nan = torch.tensor(math.nan, device=device)
        self._prev = [torch.empty_like(m.weight) for m in self.linears]

    def begin_step(self, step: int) -> bool:
        """Start step ``step``; returns whether it is recorded (then call the two methods below)."""
        self._active = step in self._steps
        if self._active:
            self._row += 1
            if self._row == self._norms.shape[0]:
                self._grow()
            self._recorded.append(step)
            self._batch.append(0)
            self._grad_out = [None] * len(self.linears)
        return self._active

    def _grow(self) -> None:
        old = (self._norms, self._update, self._act)
        self._buffers_for(2 * old[0].shape[0], old[0].device)
        for new, prev in zip((self._norms, self._update, self._act), old, strict=False):
            new[: prev.shape[0]] = prev

    def after_backward(self, loss: torch.Tensor) -> None:
        """Read the gradients (call after ``backward``, before clipping and the optimizer step)."""
        if not self._active:
            return
        self._active = False  # no forward hooks until the next recorded step
        weights = [m.weight for m in self.linears]
        tensors = [g if g is not None else self._nan for g in self._grad_out]
        tensors += [w.grad if w.grad is not None else self._nan for w in weights]
        tensors += [m.bias.grad if m.bias is not None and m.bias.grad is not None else self._nan
                    for m in self.linears]
        tensors += weights
        norms = torch._foreach_norm([t.detach() for t in tensors])
        torch.stack([*norms, loss.detach().float()], out=self._norms[self._row])
        torch._foreach_copy_(self._prev, [w.detach() for w in weights])
        self._grad_out = [None] * len(self.linears)
        self._pending_update = True

    def after_update(self) -> None:
        """Measure the update the optimizer just made (call right after ``optimizer.step()``)."""
        if not self._pending_update:
            return
        self._pending_update = False
        weights = [m.weight.detach() for m in self.linears]
        deltas = torch._foreach_sub(weights, self._prev)
        torch.stack(torch._foreach_norm(deltas), out=self._update[self._row])

    # -- output --------------------------------------------------------------------------------
    def flush(self, epoch: int = 0) -> pd.DataFrame:
        """Move the buffered rows to the host as a tidy frame (one row per step and layer)."""
        rows = len(self._recorded)
        n = len(self.linears)
        norms = self._norms[:rows].double().cpu().numpy()
        update = self._update[:rows].double().cpu().numpy()
        act = self._act[:rows].double().cpu().numpy()
        steps = np.asarray(self._recorded, dtype=np.int64)
        batch = np.asarray(self._batch, dtype=np.float64)[:, None]
        self._recorded, self._batch, self._row = [], [], -1
        self._norms.fill_(math.nan)
        self._update.fill_(math.nan)
        self._act.fill_(math.nan)
        if rows == 0:
            return empty_frame()

        def per_layer(block: int) -> np.ndarray:
            return norms[:, block * n:(block + 1) * n].reshape(-1)

        widths = np.array([m.out_features for m in self.linears], dtype=np.float64)
        numel = batch * widths  # (rows, n): elements of z per row and layer
        hidden = np.arange(n) < n - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            act_mean = np.where(hidden, act[:, :, 0] / numel, np.nan)
            saturated = np.where(hidden & self.activation.saturating, act[:, :, 1] / numel, np.nan)
            dead = np.where(hidden & self.activation.relu_family, act[:, :, 2] / widths, np.nan)
            ratio = update.reshape(-1) / per_layer(3)
        return pd.DataFrame({
            "step": np.repeat(steps, n),
            "epoch": np.full(rows * n, epoch, dtype=np.int64),
            "layer": np.tile(np.arange(n, dtype=np.int64), rows),
            "grad_output_norm": per_layer(0),
            "grad_weight_norm": per_layer(1),
            "grad_bias_norm": per_layer(2),
            "weight_norm": per_layer(3),
            "update_ratio": ratio,
            "act_grad_mean": act_mean.reshape(-1),
            "saturated_frac": saturated.reshape(-1),
            "dead_frac": dead.reshape(-1),
            "loss": np.repeat(norms[:, 4 * n], n),
        })


def empty_frame() -> pd.DataFrame:
    """A grads frame with no rows but the right columns and dtypes."""
    frame = pd.DataFrame({"step": np.zeros(0, np.int64), "epoch": np.zeros(0, np.int64),
                          "layer": np.zeros(0, np.int64)})
    for column in COLUMNS:
        frame[column] = np.zeros(0, np.float64)
    return frame
