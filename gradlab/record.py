"""``GradientRecorder``: hooks on a model's layers that record per-layer gradient statistics.

The statistics live in device buffers indexed by a host-side counter, so the step loop never waits
for the device; ``flush()`` copies them to the host once, at an epoch end, as tidy rows.
``gradlab.watch`` (``watcher.py``) drives this recorder from PyTorch's own hooks instead of calls.

Which layers: every ``nn.Linear`` by default, ``nn.Conv1d/2d`` or a name predicate on request
(``layers.select``). Each carries its qualified name (``layer_name``); ``layer`` numbers them by
their first call in the forward pass (modules never called come last, in registration order).
A module called several times in one step (a shared block, a tied layer) is one layer: its
calls are taken together as one larger batch - ``grad_output_norm`` is the norm of dL/dz over all
calls (the square root of the sum of their squared norms), the f' statistics pool every call's
z (a unit is dead when it is positive in no call), and its parameter columns are those of the
accumulated ``.grad``, the one the optimizer uses.

How each column is obtained (README, "Recorded columns"):

* ``grad_output_norm``: a forward hook on each layer registers a *tensor* hook on its output z,
  which receives dL/dz. (A module full backward hook would break in-place activations that
  overwrite z, and would need the first layer's input to require grad.) A tensor hook registered
  before an in-place op still receives the gradient w.r.t. the value before it. A layer whose
  forward hook never fires (``nn.MultiheadAttention`` calls ``F.linear`` on its ``out_proj``'s
  weights) has this column and its f' columns empty; its parameter columns are still recorded.
* ``grad_weight_norm`` / ``grad_bias_norm``: the ``.grad`` after accumulation and *before* any
  gradient clipping (read in ``after_backward()``, or by ``watch`` as each ``.grad`` is
  accumulated), so the records show the raw gradient.
* ``act_grad_mean``, ``saturated_frac``, ``dead_frac``: f' of the activation that follows the
  layer (``layers.layer_activations``: found from the model, given, or empty where unknown -
  never computed with a guessed function). In a plain ``Linear, act, Linear, …`` Sequential
  (``build_mlp``'s), f' of sigmoid, tanh and the relu family is a function of the activation's
  *output*, which is the next Linear's input: it is read there, and the statistics of a whole
  chunk of steps are taken at once. Elsewhere f'(z) is taken in the forward hook, before any
  in-place activation can overwrite z; for the relu family only each unit's count of z > 0
  is taken there (on a CPU with numba one pass over z, ``engines/positives.py``; else two),
  from which ``flush`` derives the three columns. The kernel only counts (NaN is not > 0,
  in both), so the records are the same bits with numba or without. Units: output features
  (Linear) or channels (Conv).
* ``update_ratio``: ‖ΔW‖ / ‖W‖ of the update the optimizer *intends*, ‖W‖ taken before the
  update (``weight_norm``), each weight with its own parameter group's settings. SGD: lr times
  the norm of the direction it applies - the gradient (``.grad`` as the optimizer sees it, so
  after clipping), plus weight decay · W, the momentum buffer, or for Nesterov gradient +
  momentum · buffer - taken before the new weights are rounded to their dtype, so where lr·g is
  far below the weights' float spacing it is the intended update, not rounding noise. Adam,
  AdamW and any other optimizer: the weights are snapshotted before the step and differenced
  after it (the update as applied).
* ``applied_update_ratio`` (``applied_updates=True``; costs a weight copy per recorded step):
  ‖W_after − W_before‖ / ‖W_before‖ as actually stored in the weights' dtype.

Norms are exact down to the smallest positive float32 (a float32 square underflows below ~1e-19):
on the CPU each norm is taken in float32 and taken again accumulating in float64 only where the
float32 one is too small (or not finite) to be trusted - reading a CPU tensor is no device
synchronisation; on other devices every norm accumulates in float64 (MPS, without float64:
scaled by the largest entry first, as LAPACK's nrm2 does). The buffers hold float64.

Under ``torch.amp.GradScaler`` the gradients that are recorded are those of the *scaled* loss
(dL/dz and ``.grad`` times ``scaler.get_scale()``; ``update_ratio`` is unaffected for the
snapshot optimizers); a step the scaler skips is not an optimizer step.

Cost. Per recorded step the device work is one fused norm over dL/dz, the gradients and the
weights (taken as the backward pass ends, or in ``after_backward``) written into the row
buffer (on the CPU through its numpy view), and the f' passes above; the layers' hooks are
registered only while steps are recorded, so unrecorded steps run without them.
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
from collections.abc import Iterable
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import compat
from .activations import SATURATION, Activation, get
from .layers import Spec, layer_activations, select, unit_axis, units

USE_KERNELS = True  # False: PyTorch ops only (the tests compare both)


@functools.cache
def _kernel_module(name: str):
    try:
        return importlib.import_module(f".engines.{name}", __package__)
    except ImportError:  # no numba (gradlab[fast])
        return None


def optional_kernel(module: str, name: str):
    """``gradlab.engines.<module>.<name>``, a numba kernel, imported on first use (numba takes
    a moment to load); None without numba or with ``USE_KERNELS`` off."""
    found = _kernel_module(module) if USE_KERNELS else None
    return getattr(found, name) if found is not None else None

COLUMNS = (
    "grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm", "update_ratio",
    "applied_update_ratio", "act_grad_mean", "saturated_frac", "dead_frac", "loss",
)
LOG_POINTS_PER_DECADE = 20
CHUNK_BYTES = 2 << 20  # activations buffered before their stats are taken (and as much scratch)
# A float32 norm at least this large lost nothing to underflow: the squares that underflow
# (below ~1e-45 each) add less than 1e-44 per entry to a sum of at least 1e-30.
TRUSTED_NORM = 1e-15


def derivative_into(activation: str, from_output: bool):
    """f' as ``fn(t, out) -> out`` of the activation's output (``from_output``: see the
    registry's ``Activation.from_output``) or input."""
    act = get(activation)
    if from_output:
        return act.from_output
    return lambda z, out: out.copy_(act.derivative(z))


# how a layer's update_ratio is measured at a recorded step
_SNAPSHOT, _FROM_GRAD_NORM, _FROM_TENSORS = 0, 1, 2
# what an SGD plan depends on (SGD's groups have every key)
_PLAN_SETTINGS = operator.itemgetter("lr", "momentum", "weight_decay", "nesterov")


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


def norms_into(out: torch.Tensor | np.ndarray, tensors: list[torch.Tensor | None],
               extra: tuple[torch.Tensor, ...] = ()) -> None:
    """Write the 2-norm of each tensor (None: NaN), then the 0-d ``extra`` values, into the
    1-d ``out``; norms exact down to the smallest positive float32 (see the module docstring).

    ``out``: a tensor on the tensors' device, or for CPU tensors a numpy array (a CPU buffer's
    host view: the values are read and written without a further torch operation)."""
    if not isinstance(out, np.ndarray):
        if out.device.type != "cpu":
            _device_norms_into(out, tensors, extra)
            return
        out = out.numpy()
    # (the step loop's path: every line here runs between kernels, with cold caches)
    try:
        values = [norm.item() for norm in compat.foreach_norm(tensors)]
    except TypeError:  # a None among them (a layer not called, no bias, no .grad yet)
        real = [t for t in tensors if t is not None]
        found = iter([norm.item() for norm in compat.foreach_norm(real)] if real else [])
        values = [math.nan if t is None else next(found) for t in tensors]
    if not (values and TRUSTED_NORM <= min(values) and sum(values) < math.inf):
        for i, value in enumerate(values):  # (NaN fails the test too)
            if not TRUSTED_NORM <= value < math.inf and tensors[i] is not None:
                values[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64).item()
    for value in extra:
        values.append(value.item())
    out[:] = values


@torch.no_grad()  # (gradients of backward(create_graph=True) require grad)
def _device_norms_into(out: torch.Tensor, tensors: list[torch.Tensor | None],
                       extra: tuple[torch.Tensor, ...]) -> None:
    """``norms_into`` on a device: every norm accumulated in float64 (MPS: scaled), no
    synchronisation."""
    real = [t for t in tensors if t is not None]
    if out.device.type == "mps":
        norms = [_scaled_norm(t) for t in real]
    else:
        norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in real]
    if len(real) < len(tensors):
        nan = norms[0].new_full((), math.nan) if norms else out.new_full((), math.nan)
        found = iter(norms)
        norms = [nan if t is None else next(found) for t in tensors]
    torch.stack([*norms, *extra], out=out)


def exact_norms(tensors: list[torch.Tensor | None]) -> list[float]:
    """The 2-norm of each tensor as ``norms_into`` takes it, on the host (None: NaN)."""
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    dtype = torch.float32 if device.type == "mps" else torch.float64
    out = torch.empty(len(tensors), dtype=dtype, device=device)
    norms_into(out, tensors)
    return out.tolist()


def _scaled_norm(t: torch.Tensor) -> torch.Tensor:
    largest = t.abs().amax()
    scaled = torch.linalg.vector_norm(t / largest) * largest
    return torch.where(largest > 0, scaled, largest)


def _per_unit_sum(t: torch.Tensor, axis: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over everything but the unit axis (``axis``, counted from the end: -1 for features,
    -3 for a Conv2d's channels)."""
    width = t.shape[axis]
    if axis == -1:
        return torch.sum(t.reshape(-1, width), 0, out=out)
    return torch.sum(t.reshape(-1, width, math.prod(t.shape[axis + 1:])), (0, 2), out=out)


def _slope(act: Activation) -> float:
    """f' of a relu-family activation at negative inputs (0 for relu)."""
    if act.name not in _SLOPES:
        _SLOPES[act.name] = 0.0 if act.name == "relu" else act.derivative(
            torch.tensor(-1.0)).item()
    return _SLOPES[act.name]


_SLOPES: dict[str, float] = {}


def _is_plain_mlp(model: nn.Module, linears: list[nn.Module], activation) -> bool:
    """Whether ``model`` is ``Linear, act, Linear, act, …, Linear`` with ``act`` the named
    activation, so that each Linear after the first receives the previous activation's output."""
    if not isinstance(model, nn.Sequential) or not isinstance(activation, str):
        return False
    act_type = type(get(activation).module())
    children = list(model.children())
    expected = [linears[i // 2] if i % 2 == 0 else None for i in range(2 * len(linears) - 1)]
    return len(children) == len(expected) and all(
        child is want if want is not None else type(child) is act_type
        for child, want in zip(children, expected, strict=True))


def _update_plan(optimizer, weight: torch.Tensor, groups: dict[int, dict]):
    """How the intended update of ``weight`` is known: ``(mode, lr, group)`` (see the module
    docstring); a snapshot where it cannot be read from the optimizer."""
    group = groups.get(id(weight))
    if type(optimizer) is not torch.optim.SGD or group is None or isinstance(
            group["lr"], torch.Tensor):
        return _SNAPSHOT, 1.0, None
    if group["momentum"] == 0 and group["weight_decay"] == 0:
        return _FROM_GRAD_NORM, group["lr"], group
    return _FROM_TENSORS, group["lr"], group


def _sgd_direction(weight: nn.Parameter, before: torch.Tensor | None, group: dict,
                   state: dict) -> torch.Tensor:
    """The direction SGD just applied to ``weight`` (its update is -lr times it)."""
    momentum = group["momentum"]
    if momentum != 0 and not group["nesterov"]:
        return state[weight]["momentum_buffer"]
    direction = weight.grad
    if group["weight_decay"] != 0:
        direction = direction + group["weight_decay"] * before
    if momentum != 0:
        direction = direction + momentum * state[weight]["momentum_buffer"]
    return direction


class GradientRecorder:
    """Record per-layer gradient statistics of a model's layers (see the module docstring).

    Use as a context manager (hooks are removed on exit), and per step::

        if rec.begin_step(step):      # before the forward pass
            ...forward, loss.backward()...
            rec.after_backward(loss)  # before clipping and optimizer.step()
            optimizer.step()
            rec.after_update()
        rows = rec.flush()            # at an epoch end: a tidy DataFrame

    ``gradlab.watch`` makes these calls from PyTorch's hooks; use this class directly for loops
    without a ``torch.optim`` optimizer.

    Args:
        model: any module.
        activation: what follows each recorded layer, for f', saturation and dead units: None
            (found from the model where it says so; elsewhere those columns stay empty), a
            mapping from layer names to activation names (None: no activation), or one name
            for every layer but the output layer (the one first called last).
        steps: the steps to record (see ``recorded_steps``), or an int N: every N-th step.
        optimizer: the optimizer that updates the model, if known: for ``torch.optim.SGD`` the
            update norm is then read from what SGD applies instead of a weight snapshot.
        modules: which modules to record (see ``layers.select``): every ``nn.Linear`` by default.
        applied_updates: also record ``applied_update_ratio`` (a weight copy per recorded step).
    """

    def __init__(self, model: nn.Module, activation: Spec = None,
                 steps: Iterable[int] | int = 1, *,
                 optimizer: torch.optim.Optimizer | None = None, modules=None,
                 applied_updates: bool = False):
        named = select(model, modules)
        self.names = [name for name, _ in named]
        self.linears = [module for _, module in named]  # every recorded module, Linear or not
        self.activations = layer_activations(model, self.names, activation)
        # one name for every layer: the output layer, known once the forward pass ran, has none
        self._drop_last = isinstance(activation, str)
        n = len(self.linears)
        self._every = steps if isinstance(steps, int) else None
        self._steps = set() if self._every is not None else {int(s) for s in steps}
        params = [(m.weight, getattr(m, "bias", None)) for m in self.linears]
        self._weight_params = [w for w, _ in params]
        self._bias_params = [b if isinstance(b, torch.Tensor) else None for _, b in params]
        self._weights = [w.detach() for w in self._weight_params]  # aliases, no autograd
        self._prev: list[torch.Tensor] | None = None  # weight snapshot
        self._group_of: dict[int, dict] = {}
        self._group_count = -1
        self._plan_settings: list[tuple] | None | bool = False  # what the plans were made for
        self._optimizer = optimizer
        self._sgd = type(optimizer) is torch.optim.SGD
        self.applied_updates = applied_updates
        self._plain = _is_plain_mlp(model, self.linears, activation)
        self.activation = get(activation) if isinstance(activation, str) else None
        if self._plain:  # f' from the next Linear's input (the activation output), or z itself
            self._from_output = self.activation.from_output is not None
            self._derivative = derivative_into(activation, self._from_output)
            self._copy_z = any(getattr(m, "inplace", False) for m in model.modules())
        self._axes = [unit_axis(m) for m in self.linears]
        self._unit_counts = [units(m) for m in self.linears]
        self._widths = np.array(self._unit_counts, dtype=np.float64)
        # relu-family layers (outside the plain MLP): their per-unit counts of z > 0 per row
        self._count_at: dict[int, slice] = {}
        start = 0
        for i, act in enumerate(self.activations):
            if not self._plain and act is not None and act.relu_family:
                self._count_at[i] = slice(start, start + self._unit_counts[i])
                start += self._unit_counts[i]
        self._count_width = start
        self._count_positive = (optional_kernel("positives", "count_positive_into")
                                if start else None)
        self.read_at_backward_end = False  # watch: read .grad as the backward pass ends
        self._queued = False
        # (a hook's every line counts: it runs between PyTorch's kernels, with cold caches)
        hook = (self._plain_forward_hook if self._plain and self._from_output
                else self._forward_hook)
        self._forward_hooks = [partial(hook, i) for i in range(n)]
        self._grad_hooks = [partial(self._grad_output_hook, i) for i in range(n)]
        self._handles: list = []
        self._entered = False
        self._active = False
        self._read = False  # the gradients of the current row have been read
        self._pending_update = False
        self._order: list[int] = []  # recorded modules by first call in the forward pass
        self._called = [False] * n
        self._recorded: list[int] = []
        self._numel: list[np.ndarray] = []  # per recorded row: elements of z per layer
        self._update_mode: list[list[int]] = []  # per row and layer: how update_ratio is known
        self._update_scale: list[list[float]] = []  # ...and the factor (lr) its norm is scaled by
        self._row = -1
        self._hidden: list[torch.Tensor | None] = [None] * max(n - 1, 0)
        self._grad_out: list[list[torch.Tensor]] | None = None  # each layer's dL/dz per call
        self._reset_step()
        self._chunk: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None  # _layer_stats' float flags
        self._flags: dict[tuple, torch.Tensor] = {}  # ...as views of each shape
        self._hidden_batch = -1
        self._chunk_start = 0  # recorded row of the chunk's first entry
        self._chunk_rows = 0
        self._buffers_for(16)
        self._segments = hidden_segments([units(m) for m in self.linears[:-1]],
                                         self._nan.device)

    def _reset_step(self) -> None:
        n = len(self.linears)
        if self._grad_out is None or any(self._grad_out):  # (after_backward empties them)
            self._grad_out = [[] for _ in range(n)]
        if not self._plain:  # the plain MLP's statistics are taken per chunk
            self._sums: list[torch.Tensor | None] = [None] * n  # sum f', saturated count
        self._step_numel = [0] * n  # (Python ints: numpy in the step loop costs more)

    # -- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> GradientRecorder:
        self._entered = True
        self._set_hooks(True)
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        self._set_hooks(False)
        self._active = False

    def hooks(self, on: bool) -> None:
        """Register (or remove) the layers' forward hooks now, inside the ``with`` block
        (``begin_step`` does as needed; ``watch`` does it between steps)."""
        if self._entered:
            self._set_hooks(on)

    def _set_hooks(self, on: bool) -> None:
        if on and not self._handles:
            self._handles = [layer.register_forward_hook(hook)
                             for layer, hook in zip(self.linears, self._forward_hooks, strict=True)]
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _forward_hook(self, index: int, module, inputs, z: torch.Tensor) -> None:
        if not self._active or not torch.is_grad_enabled():
            return
        if not self._called[index]:
            self._called[index] = True
            self._order.append(index)
        if z.requires_grad:
            z.register_hook(self._grad_hooks[index])
        if self._plain:  # f' from z (see _plain_forward_hook), kept from in-place activations
            if index < len(self._hidden):
                self._hidden[index] = z.detach().clone() if self._copy_z else z.detach()
        elif self.activations[index] is not None:
            self._layer_stats(index, z.detach())

    def _plain_forward_hook(self, index: int, module, inputs, z: torch.Tensor) -> None:
        """``_forward_hook`` for a plain MLP whose f' is read from the activations' outputs:
        its layers are called in order (``layer_order`` needs no record of it), and each
        Linear after the first receives the previous activation's output."""
        if not self._active or not torch.is_grad_enabled():
            return
        if z.requires_grad:
            z.register_hook(self._grad_hooks[index])
        if index > 0:
            self._hidden[index - 1] = inputs[0]  # autograd saves it: nothing overwrites it

    def _grad_output_hook(self, index: int, grad: torch.Tensor) -> None:
        self._grad_out[index].append(grad)
        if self.read_at_backward_end and not self._queued:
            self._queued = compat.at_backward_end(self._backward_ended)

    def _backward_ended(self) -> None:
        self._queued = False
        self.read_gradients()

    def _layer_stats(self, index: int, z: torch.Tensor) -> None:
        """Add one call's f' statistics of a layer (any shape, units on its unit axis); ``z``
        is detached, so no autograd context is needed."""
        at = self._count_at.get(index)
        if at is not None:
            # f' is 1 where z > 0, else the slope (0 for relu): each unit's count of
            # positives says all (flush turns them into the columns). On a CPU, one pass of
            # the optional kernel; else flags as floats in a reused buffer (a bool tensor and
            # its sum are several times slower than a float pass) and their per-unit sum; the
            # counts are integers, exact in float32 below 2**24 per call
            counts = self._counts[self._row, at]
            axis, add = self._axes[index], self._step_numel[index] > 0  # add: a further call
            kernel = self._count_positive
            if kernel is None or not kernel(z, axis, counts, add):
                flags = torch.gt(z, 0, out=self._flags_like(z))
                if add:
                    counts.add_(_per_unit_sum(flags, axis))
                else:
                    _per_unit_sum(flags, axis, out=counts)
        else:
            act = self.activations[index]
            fp = act.derivative(z)
            saturated = ((fp < SATURATION * act.max_derivative).sum(dtype=torch.float32)
                         if act.saturating else fp.new_zeros((), dtype=torch.float32))
            sums = torch.stack([fp.sum(dtype=torch.float32), saturated])
            previous = self._sums[index]
            self._sums[index] = sums if previous is None else previous + sums
        self._step_numel[index] += z.numel()

    def _flags_like(self, z: torch.Tensor) -> torch.Tensor:
        """A reused float32 buffer of ``z``'s shape on its device (contents undefined)."""
        key = (z.shape, z.device)
        view = self._flags.get(key)
        if view is None:
            flat = self._flat
            if flat is None or flat.numel() < z.numel() or flat.device != z.device:
                flat = self._flat = z.new_empty(z.numel(), dtype=torch.float32)
                self._flags.clear()
            view = self._flags[key] = flat[: z.numel()].view(z.shape)
        return view

    # -- buffers -------------------------------------------------------------------------------
    def _buffers_for(self, rows: int, device: torch.device | None = None) -> None:
        device = device or self._weights[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        n = len(self.linears)
        # norms: grad_output, grad_weight, grad_bias, weight (n each), then the loss
        self._capacity = rows
        self._norms = torch.full((rows, 4 * n + 1), math.nan, device=device, dtype=dtype)
        self._update = torch.full((rows, n), math.nan, device=device, dtype=dtype)
        self._applied = torch.full((rows, n), math.nan, device=device, dtype=dtype)
        # act: sum f'(z), count saturated, count dead
        self._act = torch.full((rows, n, 3), math.nan, device=device)
        self._counts = torch.full((rows, self._count_width), math.nan, device=device)
        self._nan = torch.tensor(math.nan, device=device, dtype=dtype)
        # what norms_into writes to: on the CPU the buffers' numpy views (no torch op per row)
        host = device.type == "cpu"
        self._norms_out, self._update_out, self._applied_out = (
            buffer.numpy() if host else buffer
            for buffer in (self._norms, self._update, self._applied))

    def is_recorded(self, step: int) -> bool:
        """Whether step ``step`` is one this recorder records."""
        if self._every is not None:
            return self._every > 0 and step % self._every == 0
        return step in self._steps

    def begin_step(self, step: int) -> bool:
        """Start step ``step``; returns whether it is recorded (then call the two methods below)."""
        active = self.is_recorded(step)
        if self._entered and active != bool(self._handles):
            self._set_hooks(active)  # unrecorded steps run without hooks
        self._active = active
        if active:
            self._row += 1
            if self._row == self._capacity:
                self._grow()
            self._recorded.append(step)
            self._reset_step()
            self._read = False
        return active

    def _row_buffers(self) -> tuple[torch.Tensor, ...]:
        return self._norms, self._update, self._applied, self._act, self._counts

    def _grow(self) -> None:
        old = self._row_buffers()
        self._buffers_for(2 * old[0].shape[0], old[0].device)
        for new, prev in zip(self._row_buffers(), old, strict=True):
            new[: prev.shape[0]] = prev

    def read_gradients(self) -> None:
        """Take the norms of the recorded layers' ``.grad`` now (``after_backward`` does, unless
        this was called for the step: ``watch`` calls it as the last ``.grad`` is accumulated,
        before any clipping)."""
        if self._active:
            n = len(self.linears)
            norms_into(self._norms_out[self._row, :4 * n], self._norm_inputs())
            self._read = True

    def _norm_inputs(self) -> list[torch.Tensor | None]:
        """What a row's norms are taken of: each layer's dL/dz (several calls: taken together;
        never called: None), the layers' ``.grad`` (weights, then biases) and their weights.
        Notes the weights' ``.grad``, to see later whether clipping changed them."""
        grads = [w.grad for w in self._weight_params]
        self._recorded_grads = list(zip(grads, map(compat.version, grads)))
        return ([calls[0] if len(calls) == 1 else
                 torch.cat([g.reshape(-1) for g in calls]) if calls else None
                 for calls in self._grad_out]
                + grads
                + [b.grad if b is not None else None for b in self._bias_params]
                + self._weights)

    def after_backward(self, loss: torch.Tensor | None = None) -> None:
        """Read the gradients (call after ``backward``, before clipping and the optimizer step);
        ``loss``: the batch loss, if known."""
        # (no torch.no_grad() here, in read_gradients or in after_update: their tensors are
        # gradients and detached weights, and entering it costs more than some of their work)
        if not self._active:
            return
        self._active = False  # no forward hooks until the next recorded step
        n, row = len(self.linears), self._norms_out[self._row]
        if self._read:  # the norms are in already
            if loss is not None:
                row[4 * n] = loss.detach()
        else:  # one fused norm
            norms_into(row, self._norm_inputs(), (self._nan if loss is None else loss,))
        if self._plain:
            self._store_hidden()
        else:
            self._store_sums()
        self._numel.append(self._step_numel)
        self._grad_out = [[] for _ in range(n)]  # read: let autograd reuse their memory
        self._prepare_update(n)
        self._pending_update = True

    def _prepare_update(self, n: int) -> None:
        groups = self._optimizer.param_groups if self._optimizer is not None else ()
        if len(groups) != self._group_count:  # (groups added): the param -> group map anew
            self._group_of = {id(p): g for g in groups for p in g["params"]}
            self._group_count = len(groups)
            self._plan_settings = False  # (no plans yet)
        # an SGD plan changes only with its groups' settings (a scheduler's new lr, say)
        settings = list(map(_PLAN_SETTINGS, groups)) if self._sgd else None
        if settings != self._plan_settings:
            plans = [_update_plan(self._optimizer, w, self._group_of)
                     for w in self._weight_params]
            self._plans, self._plan_settings = plans, settings
            self._plan_modes = [mode for mode, _, _ in plans]
            self._plan_scales = [lr for _, lr, _ in plans]
            self._plan_snapshot = self.applied_updates or any(
                mode == _SNAPSHOT or (mode == _FROM_TENSORS and group["weight_decay"] != 0
                                      and (group["nesterov"] or group["momentum"] == 0))
                for mode, _, group in plans)
        self._update_mode.append(list(self._plan_modes))  # (after_update may change a mode)
        self._update_scale.append(self._plan_scales)
        needs_before = self._snapshot = self._plan_snapshot
        if needs_before:
            if self._prev is None:
                self._prev = [torch.empty_like(w) for w in self._weights]
            compat.foreach_copy_(self._prev, self._weights)

    def after_update(self) -> None:
        """Measure the update the optimizer just made (call right after ``optimizer.step()``)."""
        if not self._pending_update:
            return
        self._pending_update = False
        modes = self._update_mode[-1]
        deltas = (compat.foreach_sub(self._weights, self._prev) if self._snapshot
                  else [None] * len(self._weights))
        state = self._optimizer.state if self._optimizer is not None else {}
        tensors: list[torch.Tensor | None] = []
        for i, (mode, _, group) in enumerate(self._plans):
            weight = self._weight_params[i]
            grad, version = self._recorded_grads[i]
            if mode == _SNAPSHOT:
                tensors.append(deltas[i])
            elif mode == _FROM_GRAD_NORM and weight.grad is grad and (
                    grad is None or compat.version(grad) == version):
                tensors.append(None)  # the recorded gradient norm is the update's
            else:
                modes[i] = _FROM_TENSORS  # e.g. clipped: measure what was applied
                prev = self._prev[i] if self._snapshot else None
                tensors.append(None if weight.grad is None
                               else _sgd_direction(weight, prev, group, state))
        if any(t is not None for t in tensors):
            norms_into(self._update_out[self._row], tensors)
        if self.applied_updates:
            norms_into(self._applied_out[self._row], deltas)
        self._recorded_grads = []

    # -- activation statistics -----------------------------------------------------------------
    def _store_sums(self) -> None:
        for i, sums in enumerate(self._sums):
            if sums is not None:  # (relu-family layers: their counts are in place)
                self._act[self._row, i, :2] = sums

    def _store_hidden(self) -> None:
        """The plain MLP's activations, kept for their statistics a chunk of steps at a time."""
        hidden = self._hidden
        if not hidden:
            return
        if any(h is None for h in hidden):  # a layer that was skipped: no statistics
            self._hidden = [None] * len(hidden)
            return
        batch = hidden[0].shape[0]
        if batch != self._hidden_batch:  # (elements of z per hidden layer, for this batch)
            self._hidden_batch = batch
            self._hidden_numel = [batch * width for width in self._unit_counts[:-1]]
        self._step_numel[:-1] = self._hidden_numel
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
        with torch.no_grad():  # (the outputs require grad)
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
    def layer_order(self) -> list[int]:
        """Indices into ``names`` by first call in the forward pass (never called: last)."""
        return self._order + [i for i in range(len(self.linears)) if i not in self._order]

    def pending(self) -> int:
        """The number of recorded steps not yet flushed."""
        return len(self._numel)

    def flush(self, epoch: int = 0) -> pd.DataFrame:
        """Move the buffered rows to the host as a tidy frame (one row per step and layer)."""
        if self._plain:
            self._process_chunk()
        rows = len(self._numel)  # rows whose gradients were read
        n = len(self.linears)
        # (copies: no alias of the buffers)
        norms, update, applied, act, counts = (buffer[:rows].double().cpu().numpy().copy()
                                               for buffer in self._row_buffers())
        modes = np.array(self._update_mode, dtype=np.int64).reshape(rows, n)
        scales = np.array(self._update_scale, dtype=np.float64).reshape(rows, n)
        numel = np.array(self._numel, dtype=np.float64).reshape(rows, n)
        steps = self._recorded[:rows]
        # a step begun and not yet read (flush inside a step) moves to the next flush's row 0;
        # an update not yet measured (flush before after_update) stays empty
        self._recorded, self._numel = self._recorded[rows:], []
        self._row, self._pending_update = len(self._recorded) - 1, False
        self._update_mode, self._update_scale = [], []
        for buffer in self._row_buffers():
            pending = buffer[rows].clone() if self._row == 0 else None
            buffer.fill_(math.nan)
            if pending is not None:
                buffer[0] = pending
        for i, at in self._count_at.items():  # relu family: f' sum and dead units from counts
            act[:, i] = relu_family_stats(counts[:, at], numel[:, i], self.activations[i])
        update = np.where(modes == _FROM_GRAD_NORM, norms[:, n:2 * n], update) * scales
        order = self.layer_order()
        activations = [self.activations[i] for i in order]
        if self._drop_last and not self._plain and self._order:
            activations[len(self._order) - 1] = None  # the output layer
        if self._plain:
            activations[-1] = None
        blocks = np.concatenate([norms[:, b * n:(b + 1) * n][:, order] for b in range(4)], 1)
        return grads_frame(steps, epoch, blocks, norms[:, 4 * n], update[:, order],
                           act[:, order], None, self._widths[order], activations,
                           layer_names=[self.names[i] for i in order],
                           applied=applied[:, order], numel=numel[:, order])


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
            positive = (total if activation.name == "relu"
                        else torch.clamp(a, 0, 1, out=work).ceil_().sum(-2))
            dead = positive.eq(0).to(total.dtype)
        stats = torch.stack([total, saturated, dead], -2)  # (..., 3, units)
        per_layer = stats.view(-1, stats.shape[-1]) @ segments  # one 2-d product
        return per_layer.view(*stats.shape[:-1], -1).transpose(-1, -2)


def relu_family_stats(counts: np.ndarray, numel: np.ndarray, act: Activation) -> np.ndarray:
    """(rows, 3): sum of f', saturated (none) and dead units of a relu-family layer, from each
    row's per-unit counts of z > 0 (rows, units; NaN where the layer was not called) and its
    elements of z (rows,)."""
    positive = counts.sum(1)
    slope = _slope(act)
    with np.errstate(invalid="ignore"):
        dead = np.where(np.isnan(positive), np.nan, (counts == 0).sum(1))
    return np.stack([positive * (1 - slope) + slope * numel, np.zeros_like(positive), dead], 1)


def grads_frame(steps, epoch: int, norms: np.ndarray, loss: np.ndarray, update: np.ndarray,
                act: np.ndarray, batch, widths: np.ndarray,
                activation: Activation | list[Activation | None], *,
                layer_names: list[str] | None = None, applied: np.ndarray | None = None,
                numel: np.ndarray | None = None) -> pd.DataFrame:
    """The tidy grads frame of one run from its host buffers (one row per step and layer).

    ``norms`` (rows, 4n): grad_output, grad_weight, grad_bias and weight norms, n layers each;
    ``loss`` (rows,); ``update`` (rows, n): ‖ΔW‖; ``act`` (rows, n, 3): sum f', saturated and
    dead counts; ``batch`` (rows,): batch sizes; ``widths`` (n,): each layer's units;
    ``activation``: the one after every layer but the last, or per layer (None: unknown, the f'
    columns stay empty). ``layer_names`` (n,): default ``fc0 …``, ``build_mlp``'s names;
    ``applied`` (rows, n): ‖W_after − W_before‖ (default: not recorded, empty); ``numel``
    (rows, n): elements of z per layer (default: batch × widths).
    """
    rows, n = len(steps), len(widths)
    if rows == 0:
        return empty_frame()
    if isinstance(activation, Activation):
        activation = [activation] * (n - 1) + [None]

    def per_layer(block: int) -> np.ndarray:
        return norms[:, block * n:(block + 1) * n]

    if numel is None:
        numel = np.asarray(batch, dtype=np.float64)[:, None] * widths  # elements of z
    known = np.array([a is not None for a in activation])
    saturating = np.array([a is not None and a.saturating for a in activation])
    relu_family = np.array([a is not None and a.relu_family for a in activation])
    names = layer_names if layer_names is not None else [f"fc{i}" for i in range(n)]
    if applied is None:
        applied = np.full((rows, n), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        act_mean = np.where(known, act[:, :, 0] / numel, np.nan)
        saturated = np.where(saturating, act[:, :, 1] / numel, np.nan)
        dead = np.where(relu_family, act[:, :, 2] / widths, np.nan)
        ratio = update / per_layer(3)
        applied_ratio = applied / per_layer(3)
    return pd.DataFrame({
        "step": np.repeat(np.asarray(steps, dtype=np.int64), n),
        "epoch": np.full(rows * n, epoch, dtype=np.int64),
        "layer": np.tile(np.arange(n, dtype=np.int64), rows),
        "layer_name": np.tile(np.asarray(names, dtype=object), rows),
        "grad_output_norm": per_layer(0).reshape(-1),
        "grad_weight_norm": per_layer(1).reshape(-1),
        "grad_bias_norm": per_layer(2).reshape(-1),
        "weight_norm": per_layer(3).reshape(-1),
        "update_ratio": ratio.reshape(-1),
        "applied_update_ratio": applied_ratio.reshape(-1),
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
                          "layer": np.zeros(0, np.int64),
                          # a string dtype, so that even a file without rows says so
                          "layer_name": pd.array([], dtype="string")})
    for column in COLUMNS:
        frame[column] = np.zeros(0, np.float64)
    return frame
