"""The gradient through time of recurrent layers: per recorded step and time step t,
‖∂L/∂x_t‖ and ‖∂L/∂y_t‖ over the batch, x a recurrent module's input sequence and y its output
sequence (the vanishing gradient of Hochreiter 1991 and Bengio, Simard & Frasconi 1994 is the
fall of ‖∂L/∂x_t‖ with the distance of t from the steps the loss reads).

``TimeRecorder`` records them on the same ``Hooks`` lifecycle as ``DistributionRecorder``: a
forward hook on each recorded ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` registers tensor hooks on x
(where it requires grad; else ``grad_input_norm`` is empty) and on y, whose gradients are
reduced to one float64 sum of squares per t on the device as they arrive; ``flush`` takes them
to the host as a tidy frame (``TIME_COLUMNS``), one row per (step, layer, t). Hooks are
registered only for recorded steps.

The time axis is the module's: axis 1 of a ``batch_first`` batch, else axis 0 (an unbatched
sequence too); a ``PackedSequence`` is unpacked (its padding adds nothing). ∂L/∂x is x's whole
gradient, as autograd accumulates it (through every use of x, not only this module's). A module
called several times in a step is one layer, as in the grads frame: its calls are taken
together as one larger batch, aligned at t = 0. Every backward pass of a recorded step counts
here (unlike the grads frame's dL/dz, which ``passes`` keeps to the passes that make ``.grad``).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..store import TIME_COLUMNS, empty_time
from .hooks import Hooks
from .layers import RECURRENT, select
from .schedule import Schedule

INPUT, OUTPUT = 0, 1


def time_axis(module: nn.Module, sequence: torch.Tensor) -> int:
    """The time axis of a recurrent module's (unpacked) input or output sequence."""
    return 1 if module.batch_first and sequence.dim() == 3 else 0


@torch.no_grad()  # (gradients of backward(create_graph=True) require grad)
def squares_per_t(grad: torch.Tensor, axis: int, packed: PackedSequence | None) -> torch.Tensor:
    """(T,) float64: the sum of the squares of ``grad`` at each time step (MPS: float32).

    Args:
        grad: the gradient of a sequence, or of a ``PackedSequence``'s data.
        axis: its time axis (unpacked).
        packed: the ``PackedSequence`` whose data ``grad`` is the gradient of, else None.
    """
    if packed is not None:
        grad, axis = pad_packed_sequence(packed._replace(data=grad))[0], 0
    dtype = torch.float32 if grad.device.type == "mps" else torch.float64
    dims = [d for d in range(grad.dim()) if d != axis]
    return torch.linalg.vector_norm(grad, dim=dims, dtype=dtype).square()


def pooled(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of per-t squares of several calls, aligned at t = 0 (the longest's length)."""
    if len(parts) == 1:
        return parts[0]
    total = parts[0].new_zeros(max(p.shape[0] for p in parts))
    for part in parts:
        total[: part.shape[0]] += part
    return total


class TimeRecorder:
    """Record the gradient through time of ``model``'s recurrent layers at ``steps`` (see the
    module docstring).

    Per step, like ``GradientRecorder`` (hooks only on recorded steps, removed on exit)::

        with TimeRecorder(model, steps, modules=(nn.LSTM, nn.Linear)) as times:
            times.begin_step(step)       # before the forward pass
            ...forward, loss.backward()...
            times.after_backward()       # before the optimizer step
            frame = times.flush(epoch)   # at an epoch end

    Args:
        model: any module.
        steps: the steps to record, as ``GradientRecorder`` takes them (an int N: every N-th).
        modules: which modules to record, as ``GradientRecorder`` takes it (``layers.select``);
            its recurrent ones (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) are recorded here. Without
            any (``bool(recorder)`` is False) it records nothing and registers no hook.
    """

    def __init__(self, model: nn.Module, steps=1, *, modules=None):
        named = [(n, m) for n, m in select(model, modules) if isinstance(m, RECURRENT)]
        self.names = [name for name, _ in named]
        self.modules = [module for _, module in named]
        self.schedule = Schedule(steps)
        self._hooks = Hooks.forward(self.modules, [partial(self._forward_hook, i)
                                                   for i in range(len(self.modules))])
        self._step: int | None = None  # the recorded step under way
        self._parts: list[tuple[list, list]] = []  # per layer: (x's, y's) per-t squares
        self._hooked: set[tuple[int, int]] = set()  # (layer, id of tensor) hooked this step
        self._order: list[int] = []  # layers by first call in the forward pass
        self._buffer: list[tuple[int, int, torch.Tensor]] = []  # (step, layer, (2, T) norms)

    def __bool__(self) -> bool:
        return bool(self.modules)

    def __enter__(self) -> TimeRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.off()
        self._step = None

    # -- hooks ---------------------------------------------------------------------------------
    def _forward_hook(self, index: int, module, inputs, output) -> None:
        if self._step is None or not torch.is_grad_enabled():
            return
        if index not in self._order:
            self._order.append(index)
        for which, sequence in ((INPUT, inputs[0]), (OUTPUT, output[0])):
            packed = sequence if isinstance(sequence, PackedSequence) else None
            tensor = sequence.data if packed is not None else sequence
            key = (index, id(tensor))  # (the same x given twice has one gradient)
            if not tensor.requires_grad or (which == INPUT and key in self._hooked):
                continue
            self._hooked.add(key)
            # the packed structure without its data: a hook that held the tensor would keep
            # it alive through a reference cycle
            structure = packed._replace(data=None) if packed is not None else None
            tensor.register_hook(partial(self._grad_hook, index, which,
                                         time_axis(module, tensor), structure))

    def _grad_hook(self, index: int, which: int, axis: int, packed, grad: torch.Tensor) -> None:
        if self._step is not None:  # (not a later pass through a graph kept from the step)
            self._parts[index][which].append(squares_per_t(grad, axis, packed))

    # -- the step protocol ---------------------------------------------------------------------
    def is_recorded(self, step: int) -> bool:
        """Whether step ``step`` is one this recorder records."""
        return bool(self.modules) and step in self.schedule

    def begin_step(self, step: int) -> bool:
        """Start step ``step``; returns whether it is recorded (then call ``after_backward``)."""
        recorded = self.is_recorded(step)
        self._step = step if recorded else None
        self._hooks.set(recorded)
        self._parts = [([], []) for _ in self.modules]  # (a step begun and not read: dropped)
        self._hooked = set()
        return recorded

    @torch.no_grad()
    def after_backward(self) -> None:
        """Keep this step's norms per time step (call after ``backward``, before the optimizer
        step); removes the hooks until the next recorded step."""
        if self._step is None:
            return
        self._hooks.off()
        for index, (inputs, outputs) in enumerate(self._parts):
            if not outputs and not inputs:
                continue  # not called, or no gradient reached it
            x, y = (pooled(parts) if parts else None for parts in (inputs, outputs))
            length = (y if y is not None else x).shape[0]
            nan = torch.full((length,), math.nan, dtype=(y if y is not None else x).dtype,
                             device=(y if y is not None else x).device)
            norms = torch.stack([nan if x is None else x[:length], nan if y is None else y])
            self._buffer.append((self._step, index, norms.sqrt_()))
        self._parts = [([], []) for _ in self.modules]  # (let autograd reuse their memory)
        self._hooked = set()
        self._step = None

    # -- output --------------------------------------------------------------------------------
    def pending(self) -> int:
        """The number of (step, layer) records not yet flushed."""
        return len(self._buffer)

    def flush(self, epoch: int = 0, layer_names: list[str] | None = None) -> pd.DataFrame:
        """The buffered steps as a tidy frame, one row per (step, layer, t); empties the buffer.

        Args:
            epoch: the ``epoch`` column.
            layer_names: every recorded layer's name in ``layer`` order, so that ``layer`` is
                the grads frame's (a ``GradientRecorder``'s: ``[rec.names[i] for i in
                rec.layer_order()]``); default: the recurrent layers by first call.
        """
        buffer, self._buffer = self._buffer, []
        if not buffer:
            return empty_time().drop(columns="run_id")
        order = self._order + [i for i in range(len(self.modules)) if i not in self._order]
        names = layer_names if layer_names is not None else [self.names[i] for i in order]
        number = {name: layer for layer, name in enumerate(names)}
        buffer.sort(key=lambda b: (b[0], number[self.names[b[1]]]))
        lengths = [norms.shape[1] for _, _, norms in buffer]
        # one copy to the host for the whole flush
        values = torch.cat([norms for _, _, norms in buffer], 1).double().cpu().numpy()
        return pd.DataFrame({
            "step": np.repeat([s for s, _, _ in buffer], lengths).astype(np.int64),
            "epoch": np.full(sum(lengths), epoch, dtype=np.int64),
            "layer": np.repeat([number[self.names[i]] for _, i, _ in buffer],
                               lengths).astype(np.int64),
            "layer_name": np.repeat(np.asarray([self.names[i] for _, i, _ in buffer],
                                               dtype=object), lengths),
            "t": np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]),
            "grad_input_norm": values[0],
            "grad_output_norm": values[1],
        })[list(TIME_COLUMNS[1:])]
