"""``GradientRecorder``: hooks on every ``nn.Linear`` that record per-layer gradient statistics.

The statistics live in device buffers indexed by a host-side counter, so the step loop never waits
for the device; ``flush()`` copies them to the host once, at an epoch end, as tidy rows.

How each column is obtained (README, "Recorded columns"):

* ``grad_output_norm``: a forward hook on each Linear registers a *tensor* hook on its output z,
  which receives dL/dz. (A module full backward hook would break in-place activations that
  overwrite z, and would need the first layer's input to require grad.) A tensor hook registered
  before an in-place op still receives the gradient w.r.t. the value before it.
* ``grad_weight_norm`` / ``grad_bias_norm``: read from ``.grad`` in ``after_backward()``, i.e.
  after accumulation (module backward hooks run before ``.grad`` is filled in) and *before* any
  gradient clipping, so the records show the raw gradient.
* ``act_grad_mean``, ``saturated_frac``, ``dead_frac``: f' of each hidden layer. In a plain
  ``Linear, activation, Linear, …`` Sequential (``build_mlp``'s), f' of sigmoid, tanh and the relu
  family is a function of the activation's *output*, which is the next Linear's input: it is
  read there, so nothing is recomputed and in-place activations need no copy. Elsewhere z is
  kept (copied when the model has in-place modules, which would overwrite it).
* ``update_ratio``: ‖ΔW‖ / ‖W‖ of the optimizer's update, the norm taken before the update
  (``weight_norm``). For ``torch.optim.SGD`` (without nesterov) the update is exactly
  ``-lr * g`` (no momentum, no weight decay: g is the ``.grad`` just recorded, so the ratio needs
  no extra pass over the weights) or ``-lr * momentum_buffer``; this is the update as computed,
  before the new weights are rounded to float32, so where ``lr * g`` is far below the weights'
  float spacing it is the intended update rather than the rounding noise of a difference. Any
  other optimizer: the weights are snapshotted in ``after_backward()`` and differenced in
  ``after_update()``.

Cost. Per recorded step the device work is one fused norm over all gradients and weights, one
stack into the row buffer and one concatenation of the hidden activations into a chunk buffer;
the activation statistics are computed for a whole chunk of steps at once (a few large
elementwise ops and one matmul), so the per-op dispatch cost is paid per chunk, not per step.
Hooks are registered only while steps are recorded, so unrecorded steps run hook-free.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn

from .models import ACTIVATIONS, LEAKY_SLOPE, Activation, linear_layers

COLUMNS = (
    "grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm", "update_ratio",
    "act_grad_mean", "saturated_frac", "dead_frac", "loss",
)
SATURATION = 0.05  # a unit is saturated where f'(z) < SATURATION * max f'
LOG_POINTS_PER_DECADE = 20
CHUNK_BYTES = 2 << 20  # activations buffered before their stats are taken (and as much scratch)

# f' as a function of the activation's output a = f(z), where that is exact and cheap, written
# into ``out``: sigmoid a(1 - a), tanh 1 - a² (the closed forms of ``models.ACTIVATIONS``
# evaluate f(z) first); z > 0 exactly where a > 0 for the relu family; for ELU,
# f' = min(a + 1, 1) (autograd's own ELU backward uses a + 1).
OUTPUT_DERIVATIVES = {
    "sigmoid": lambda a, out: torch.addcmul(a, a, a, value=-1, out=out),  # a - a*a
    "tanh": lambda a, out: torch.mul(a, a, out=out).neg_().add_(1),
    "relu": lambda a, out: torch.clamp(a, max=1, out=out).ceil_(),  # a >= 0: 1 where a > 0
    "leaky_relu": lambda a, out: torch.clamp(a, 0, 1, out=out).ceil_().mul_(
        1 - LEAKY_SLOPE).add_(LEAKY_SLOPE),
    "elu": lambda a, out: torch.add(a, 1, out=out).clamp_(max=1),
}


def derivative_into(activation: str, from_output: bool):
    """f' as ``fn(t, out) -> out`` of the activation's output (``from_output``) or input."""
    if from_output:
        return OUTPUT_DERIVATIVES[activation]
    closed_form = ACTIVATIONS[activation].derivative
    return lambda z, out: out.copy_(closed_form(z))


# update_ratio modes of a recorded row
_SNAPSHOT, _FROM_GRAD_NORM, _FROM_TENSORS = 0, 1, 2


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


def _is_plain_mlp(model: nn.Module, linears: list[nn.Linear], activation: str) -> bool:
    """Whether ``model`` is ``Linear, act, Linear, act, …, Linear`` with ``act`` the named
    activation, so that each Linear after the first receives the previous activation's output."""
    if not isinstance(model, nn.Sequential):
        return False
    act_type = type(ACTIVATIONS[activation].module())
    children = list(model.children())
    expected = [linears[i // 2] if i % 2 == 0 else None for i in range(2 * len(linears) - 1)]
    return len(children) == len(expected) and all(
        child is want if want is not None else type(child) is act_type
        for child, want in zip(children, expected, strict=True))


def _sgd_update_source(optimizer, weights: list[torch.Tensor]) -> str | None:
    """How the update of ``weights`` by ``optimizer`` is known without a snapshot (see the module
    docstring): ``"grad"`` or ``"momentum"``; None when it is not (then a snapshot is taken)."""
    if type(optimizer) is not torch.optim.SGD:
        return None
    groups = [g for g in optimizer.param_groups
              if any(p is w for p in g["params"] for w in weights)]
    if len(groups) != 1 or not all(any(p is w for p in groups[0]["params"]) for w in weights):
        return None
    group = groups[0]
    if group["nesterov"] or isinstance(group["lr"], torch.Tensor):
        return None
    if group["momentum"] != 0:
        return "momentum"
    return "grad" if group["weight_decay"] == 0 else None


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
        optimizer: the optimizer that updates the model, if known: for ``torch.optim.SGD`` the
            update norm is then read from what SGD applies instead of a weight snapshot.
    """

    def __init__(self, model: nn.Module, activation: str, steps: np.ndarray, *,
                 optimizer: torch.optim.Optimizer | None = None):
        self.linears = linear_layers(model)
        self.activation = ACTIVATIONS[activation]
        n = len(self.linears)
        self._steps = set(int(s) for s in steps)
        self._weight_params = [m.weight for m in self.linears]
        self._weights = [w.detach() for w in self._weight_params]  # aliases, no autograd
        self._prev: list[torch.Tensor] | None = None  # weight snapshot, for other optimizers
        self._optimizer = optimizer
        self._update_source = _sgd_update_source(optimizer, [m.weight for m in self.linears])
        # Where f' comes from: the next Linear's input (the activation output) or z itself.
        self._from_output = (activation in OUTPUT_DERIVATIVES
                             and _is_plain_mlp(model, self.linears, activation))
        self._derivative = derivative_into(activation, self._from_output)
        self._copy_z = any(getattr(m, "inplace", False) for m in model.modules())
        self._forward_hooks = [partial(self._forward_hook, i) for i in range(n)]
        self._grad_hooks = [partial(self._grad_output_hook, i) for i in range(n)]
        self._handles: list = []
        self._entered = False
        self._active = False
        self._pending_update = False
        self._recorded: list[int] = []
        self._batch: list[int] = []  # batch size of each recorded row
        self._update_mode: list[int] = []  # per recorded row: how update_ratio is measured
        self._update_scale: list[float] = []  # ...and the factor (lr) its norm is scaled by
        self._row = -1
        self._hidden: list[torch.Tensor | None] = [None] * max(n - 1, 0)
        self._grad_out: list[torch.Tensor | None] = [None] * n
        self._chunk: torch.Tensor | None = None
        self._chunk_start = 0  # recorded row of the chunk's first entry
        self._chunk_rows = 0
        self._buffers_for(16)
        self._widths = np.array([m.out_features for m in self.linears], dtype=np.float64)
        self._segments = hidden_segments([m.out_features for m in self.linears[:-1]],
                                         self._nan.device)

    # -- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> GradientRecorder:
        self._entered = True
        self._set_hooks(True)
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        self._set_hooks(False)
        self._active = False

    def _set_hooks(self, on: bool) -> None:
        if on and not self._handles:
            self._handles = [layer.register_forward_hook(hook)
                             for layer, hook in zip(self.linears, self._forward_hooks, strict=True)]
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _forward_hook(self, index: int, module, inputs, z: torch.Tensor) -> None:
        if not self._active:
            return
        if z.requires_grad:
            z.register_hook(self._grad_hooks[index])
        if self._from_output:
            if index > 0:
                self._hidden[index - 1] = inputs[0]  # autograd saves it: nothing overwrites it
        elif index < len(self._hidden):
            self._hidden[index] = z.detach().clone() if self._copy_z else z.detach()

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
        self._nan = torch.tensor(math.nan, device=device)

    def begin_step(self, step: int) -> bool:
        """Start step ``step``; returns whether it is recorded (then call the two methods below)."""
        active = step in self._steps
        if self._entered and active != bool(self._handles):
            self._set_hooks(active)  # unrecorded steps run without hooks
        self._active = active
        if active:
            self._row += 1
            if self._row == self._norms.shape[0]:
                self._grow()
            self._recorded.append(step)
            self._batch.append(0)
            self._update_mode.append(_SNAPSHOT)
            self._update_scale.append(1.0)
        return active

    def _grow(self) -> None:
        old = (self._norms, self._update, self._act)
        self._buffers_for(2 * old[0].shape[0], old[0].device)
        for new, prev in zip((self._norms, self._update, self._act), old, strict=True):
            new[: prev.shape[0]] = prev

    @torch.no_grad()
    def after_backward(self, loss: torch.Tensor) -> None:
        """Read the gradients (call after ``backward``, before clipping and the optimizer step)."""
        if not self._active:
            return
        self._active = False  # no forward hooks until the next recorded step
        nan = self._nan
        grads = [w.grad for w in self._weight_params]
        tensors = [g if g is not None else nan for g in self._grad_out]
        tensors += [g if g is not None else nan for g in grads]
        tensors += [m.bias.grad if m.bias is not None and m.bias.grad is not None else nan
                    for m in self.linears]
        tensors += self._weights
        norms = torch._foreach_norm(tensors)
        if loss.dtype != self._norms.dtype:
            loss = loss.to(self._norms.dtype)
        torch.stack([*norms, loss], out=self._norms[self._row])
        self._grad_out = [None] * len(self.linears)
        self._store_hidden()
        self._prepare_update(grads)
        self._pending_update = True

    def _prepare_update(self, grads: list[torch.Tensor | None]) -> None:
        if self._update_source is None or any(g is None for g in grads):
            if self._prev is None:
                self._prev = [torch.empty_like(w) for w in self._weights]
            torch._foreach_copy_(self._prev, self._weights)
            self._mode = _SNAPSHOT
        else:
            # remember the gradients as recorded, to see whether clipping changed them
            self._recorded_grads = [(g, g._version) for g in grads]
            self._mode = _FROM_TENSORS if self._update_source == "momentum" else _FROM_GRAD_NORM

    @torch.no_grad()
    def after_update(self) -> None:
        """Measure the update the optimizer just made (call right after ``optimizer.step()``)."""
        if not self._pending_update:
            return
        self._pending_update = False
        mode, scale = self._mode, 1.0
        if mode == _SNAPSHOT:
            deltas = torch._foreach_sub(self._weights, self._prev)
            torch.stack(torch._foreach_norm(deltas), out=self._update[self._row])
        else:
            group = self._optimizer.param_groups[0]
            scale = group["lr"]
            if mode == _FROM_TENSORS:
                state = self._optimizer.state
                applied = [state[w].get("momentum_buffer", self._nan) for w in self._weight_params]
            else:
                applied = [g for g, _ in self._recorded_grads]
                if any(w.grad is not g or g._version != v
                       for w, (g, v) in zip(self._weight_params, self._recorded_grads,
                                            strict=True)):
                    mode = _FROM_TENSORS  # clipped (or replaced): measure what was applied
                    applied = [w.grad for w in self._weight_params]
            if mode == _FROM_TENSORS:
                torch.stack(torch._foreach_norm(applied), out=self._update[self._row])
            self._recorded_grads = []
        self._update_mode[-1], self._update_scale[-1] = mode, scale

    # -- activation statistics, a chunk of recorded steps at a time ------------------------------
    def _store_hidden(self) -> None:
        hidden = self._hidden
        if not hidden:
            return
        if any(h is None for h in hidden):  # e.g. a model that skipped a layer: no statistics
            self._hidden = [None] * len(hidden)
            return
        batch = hidden[0].shape[0]
        self._batch[-1] = batch
        chunk = self._chunk
        if chunk is not None and (chunk.shape[1] != batch or self._chunk_rows == chunk.shape[0]
                                  or self._chunk_start + self._chunk_rows != self._row):
            self._process_chunk()
            chunk = self._chunk
        if chunk is None or chunk.shape[1] != batch:
            width = self._segments.shape[0]
            rows = max(1, CHUNK_BYTES // (batch * width * hidden[0].element_size()))
            chunk = self._chunk = hidden[0].new_empty((rows, batch, width))
            self._work = torch.empty_like(chunk)
        if self._chunk_rows == 0:
            self._chunk_start = self._row
        torch.cat(hidden, dim=1, out=chunk[self._chunk_rows])
        self._chunk_rows += 1
        self._hidden = [None] * len(hidden)

    def _process_chunk(self) -> None:
        rows = self._chunk_rows
        if rows == 0:
            return
        start = self._chunk_start
        stats = activation_stats(self._chunk[:rows], self._derivative, self.activation,
                                 self._segments, self._work[:rows])
        self._act[start:start + rows, : stats.shape[1]] = stats
        self._chunk_rows = 0

    # -- output --------------------------------------------------------------------------------
    def flush(self, epoch: int = 0) -> pd.DataFrame:
        """Move the buffered rows to the host as a tidy frame (one row per step and layer)."""
        self._process_chunk()
        rows = len(self._recorded)
        n = len(self.linears)
        norms = self._norms[:rows].double().cpu().numpy()
        update = self._update[:rows].double().cpu().numpy()
        act = self._act[:rows].double().cpu().numpy()
        modes = np.asarray(self._update_mode, dtype=np.int64)
        scales = np.asarray(self._update_scale, dtype=np.float64)
        steps, batch = self._recorded, self._batch
        self._recorded, self._batch, self._row = [], [], -1
        self._update_mode, self._update_scale = [], []
        self._norms.fill_(math.nan)
        self._update.fill_(math.nan)
        self._act.fill_(math.nan)
        update = np.where((modes == _FROM_GRAD_NORM)[:, None], norms[:, n:2 * n], update)
        return grads_frame(steps, epoch, norms[:, :4 * n], norms[:, 4 * n],
                           update * scales[:, None], act, batch, self._widths, self.activation)


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

    Returns (..., hidden layers, 3). Only float arithmetic, in place: on CPU, comparisons that
    produce bool tensors (and their sums) are several times slower than a float pass.
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
            positive = (total if activation is ACTIVATIONS["relu"]
                        else torch.clamp(a, 0, 1, out=work).ceil_().sum(-2))
            dead = positive.eq(0).to(total.dtype)
        stats = torch.stack([total, saturated, dead], -2)  # (..., 3, units)
        per_layer = stats.view(-1, stats.shape[-1]) @ segments  # one 2-d product
        return per_layer.view(*stats.shape[:-1], -1).transpose(-1, -2)


def grads_frame(steps, epoch: int, norms: np.ndarray, loss: np.ndarray, update: np.ndarray,
                act: np.ndarray, batch, widths: np.ndarray,
                activation: Activation) -> pd.DataFrame:
    """The tidy grads frame of one run from its host buffers (one row per step and layer).

    ``norms`` (rows, 4n): grad_output, grad_weight, grad_bias and weight norms, n layers each;
    ``loss`` (rows,); ``update`` (rows, n): ‖ΔW‖; ``act`` (rows, n, 3): sum f', saturated and
    dead counts; ``batch`` (rows,): batch sizes; ``widths`` (n,): each layer's output width.
    """
    rows, n = len(steps), len(widths)
    if rows == 0:
        return empty_frame()

    def per_layer(block: int) -> np.ndarray:
        return norms[:, block * n:(block + 1) * n]

    numel = np.asarray(batch, dtype=np.float64)[:, None] * widths  # elements of z per layer
    hidden = np.arange(n) < n - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        act_mean = np.where(hidden, act[:, :, 0] / numel, np.nan)
        saturated = np.where(hidden & activation.saturating, act[:, :, 1] / numel, np.nan)
        dead = np.where(hidden & activation.relu_family, act[:, :, 2] / widths, np.nan)
        ratio = update / per_layer(3)
    return pd.DataFrame({
        "step": np.repeat(np.asarray(steps, dtype=np.int64), n),
        "epoch": np.full(rows * n, epoch, dtype=np.int64),
        "layer": np.tile(np.arange(n, dtype=np.int64), rows),
        "grad_output_norm": per_layer(0).reshape(-1),
        "grad_weight_norm": per_layer(1).reshape(-1),
        "grad_bias_norm": per_layer(2).reshape(-1),
        "weight_norm": per_layer(3).reshape(-1),
        "update_ratio": ratio.reshape(-1),
        "act_grad_mean": act_mean.reshape(-1),
        "saturated_frac": saturated.reshape(-1),
        "dead_frac": dead.reshape(-1),
        "loss": np.repeat(np.asarray(loss, dtype=np.float64), n),
    })


def hidden_segments(widths, device=None) -> torch.Tensor:
    """The (sum of widths, layers) 0/1 matrix that sums concatenated units per layer."""
    segments = torch.zeros(sum(widths), len(widths), device=device)
    start = 0
    for layer, width in enumerate(widths):
        segments[start:start + width, layer] = 1
        start += width
    return segments


def empty_frame() -> pd.DataFrame:
    """A grads frame with no rows but the right columns and dtypes."""
    frame = pd.DataFrame({"step": np.zeros(0, np.int64), "epoch": np.zeros(0, np.int64),
                          "layer": np.zeros(0, np.int64)})
    for column in COLUMNS:
        frame[column] = np.zeros(0, np.float64)
    return frame
