"""``GradientRecorder``: the step protocol (begin_step / after_backward / after_update / flush)
that ties the recorder's parts together; the package docstring says how each column is taken."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import compat
from .buffers import RowBuffers
from .frames import grads_frame
from .hooks import Hooks
from .layer_stats import CallStats, ChunkedStats
from .layers import Spec, is_plain_mlp, joint, output_tensor, recorded_layers
from .norms import norms_into
from .passes import Passes
from .schedule import Schedule
from .traced import Traced
from .updates import UpdateMeter

# where a step is: not recorded (or its gradients read by after_backward), recording, or
# recording with its gradients' norms already taken (at the backward pass's end)
IDLE, RECORDING, READ = 0, 1, 2


class GradientRecorder:
    """Record per-layer gradient statistics of a model's layers (see the package docstring).

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
        model: any module; a ``torch.compile``d one too (its layers by their own names, no
            graph break: ``traced``).
        activation: what follows each recorded layer, for f', saturation and dead units: None
            (found from the model where it says so; elsewhere those columns stay empty), a
            mapping from layer names to activation names (None: no activation), or one name
            for every layer but the output layer (the one first called last).
        steps: the steps to record (see ``recorded_steps``), or an int N: every N-th step.
        optimizer: the optimizer that updates the model, if known: for ``torch.optim.SGD`` the
            update norm is then read from what SGD applies instead of a weight snapshot.
        modules: which modules to record (see ``layers.select``): every ``nn.Linear`` by default.
        applied_updates: also record ``applied_update_ratio`` (a weight copy per recorded step).
        read_at_backward_end: take the gradients' norms as each backward pass ends (before any
            clipping), and count only the passes that accumulate into the recorded layers'
            ``.grad`` since it was last zeroed (``passes.Passes``; ``watch`` does).
        scaler: the ``torch.amp.GradScaler`` that scales the loss, if any: the records are
            then those of the real loss (divided by its scale).
    """

    def __init__(self, model: nn.Module, activation: Spec = None,
                 steps: Iterable[int] | int = 1, *,
                 optimizer: torch.optim.Optimizer | None = None, modules=None,
                 applied_updates: bool = False, read_at_backward_end: bool = False,
                 scaler=None):
        given, model = model, compat.uncompiled(model)  # (a compiled model's layers by name)
        self._model = model
        self.layers = recorded_layers(model, modules, activation)
        self.names = [layer.name for layer in self.layers]
        self.linears = [layer.module for layer in self.layers]  # every recorded module
        self._single = all(len(layer.weights) == 1 for layer in self.layers)
        self.schedule = Schedule(steps)
        self.by_pass = read_at_backward_end
        self._one_activation = isinstance(activation, str)  # the output layer's is dropped
        plain = not self.by_pass and is_plain_mlp(model, self.layers, activation)
        self._stats = (ChunkedStats(model, self.layers, activation) if plain
                       else CallStats(self.layers))
        device = self.layers[0].value.device
        self._buffers = self._stats.buffers = RowBuffers(len(self.layers),
                                                         self._stats.count_width, device)
        self._updates = UpdateMeter(self.layers, optimizer, applied_updates)
        self._scaler = scaler  # a torch.amp.GradScaler: norms are divided by its scale
        self._state = IDLE
        self._order: list[int] = []  # layers by first call in the forward pass
        self._called: set[int] = set()
        self._row = -1  # the buffers' row of the current recorded step
        self._steps: list[int] = []  # the step of each row
        self._numel: list[list[int]] = []  # per read row: elements of z per layer
        self._scales: list = []  # per read row: the loss scale (GradScaler) the norms carry
        self._grad_out: list[list[torch.Tensor]] = [[] for _ in self.layers]  # dL/dz per call
        self._passes = Passes(self)
        self._traced = Traced(self.layers, any(getattr(m, "inplace", False)
                                               for m in model.modules()),
                              isinstance(self._stats, ChunkedStats))
        self._forward = Hooks(
            [lambda m=m, h=h: m.register_forward_hook(h)
             for m, h in zip(self.linears, map(self._forward_hook, range(len(self.layers))))])
        self._weights = Hooks(self._passes.registrations() if self.by_pass else [])
        self._entered = False  # inside the ``with`` block
        # the layers' hooks run in a compiled graph: they stay registered between recorded
        # steps, since dynamo does not see hooks come and go (it guards on the recorder's state
        # instead: one graph for recorded steps, one for the others)
        self.compiled = given is not model

    # -- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> GradientRecorder:
        if self.compiled:  # (a graph traced before the hooks would run without them)
            compat.forget_compiled(self._model)
        self._entered = True
        self.hooks(True)
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        self._forward.off()
        self._weights.off()
        self._state = IDLE

    def hooks(self, on: bool) -> None:
        """Register (or remove) the layers' forward hooks now, inside the ``with`` block
        (``begin_step`` does as needed; ``watch`` does it between steps). A compiled model's
        stay registered until the block ends (``traced``)."""
        if self._entered:
            self._forward.set(on or self.compiled)
            self._weights.set(on)

    def _forward_hook(self, index: int):
        stats, grad_out, passes, traced = self._stats, self._grad_out, self._passes, self._traced

        def hook(module, inputs, z: torch.Tensor):
            if self._state == IDLE or not torch.is_grad_enabled():
                return None
            if compat.is_compiling():  # inside torch.compile: what a graph holds (traced.py)
                self.compiled = True
                return traced.forward(index, inputs, z)
            if not isinstance(z, torch.Tensor):  # a recurrent module's (output, h)
                z = output_tensor(z)
            self._called_now(index)
            call = stats.forward(index, inputs, z)
            if not self.by_pass:  # every call counts (the caller says what a step is)
                stats.commit(call)
                if z.requires_grad:
                    z.register_hook(grad_out[index].append)
            elif z.requires_grad:  # counts once a backward pass that makes .grad uses it
                z.register_hook(partial(passes.received, index, call))
            return None

        return hook

    def _called_now(self, index: int) -> None:
        """Layer ``index`` was called in a forward pass (``layer_order``)."""
        if index not in self._called:
            self._called.add(index)
            self._order.append(index)

    def traced_items(self, used_only: bool = True) -> list[tuple]:
        """The compiled hooks' calls since the last take, as ``take``'s items (``traced``)."""
        items = self._traced.take(self._stats, used_only) if self._traced.calls else []
        for index, _, _ in items:
            self._called_now(index)
        return items

    # -- the step protocol ---------------------------------------------------------------------
    def is_recorded(self, step: int) -> bool:
        """Whether step ``step`` is one this recorder records."""
        return step in self.schedule

    def begin_step(self, step: int) -> bool:
        """Start step ``step``; returns whether it is recorded (then call the two methods below)."""
        recorded = step in self.schedule
        self.hooks(recorded)  # unrecorded steps run without hooks
        if self._state != IDLE:  # a recorded step begun and never read: begun again
            self._row -= 1
            self._steps.pop()
            self._updates.drop_row()
        self._state = RECORDING if recorded else IDLE
        if recorded:
            self._row += 1
            if self._row == self._buffers.capacity:
                self._buffers.grow()
            self._steps.append(step)
            self._updates.open_row()
            self._stats.begin(self._row)
            if self.by_pass:
                self._passes.begin()
            self._traced.reset()
            self._forget()
        return recorded

    def first_pass_only(self) -> None:
        """Count only the current step's first backward pass that makes ``.grad`` (a closure
        that ``optimizer.step`` evaluates again at trial weights: LBFGS)."""
        self._passes.first_only = True

    def _forget(self) -> None:
        """Forget the step's dL/dz (after a read: let autograd reuse their memory)."""
        for calls in self._grad_out:
            calls.clear()

    def restart(self) -> None:
        """The step's gradient was zeroed: forget its passes so far."""
        self._forget()
        self._stats.restart()

    def take(self, items: list[tuple]) -> None:
        """Add a backward pass's dL/dz and the forward calls it used to the step."""
        for index, grad, call in items:
            if grad is not None:  # (None: a compiled call whose dL/dz its layer's first holds)
                self._grad_out[index].append(grad)
            self._stats.commit(call)

    def read_gradients(self) -> None:
        """Take the norms of the recorded layers' ``.grad`` now (``after_backward`` does, unless
        this was called for the step: ``watch`` calls it as the last ``.grad`` is accumulated,
        before any clipping)."""
        if self._state != IDLE:
            norms_into(self._buffers.host[0][self._row, :4 * len(self.layers)],
                       self._norm_inputs())
            self._state = READ

    def _norm_inputs(self) -> list[torch.Tensor | None]:
        """What a row's norms are taken of: each layer's dL/dz (several calls: taken together;
        never called: None), the layers' ``.grad`` (weights, then biases) and their weights;
        a layer of several matrices (recurrent) by their joint norm (``layers.joint``)."""
        if self._single:  # (one matrix a layer: the common case, in its shortest form)
            grads = [layer.weight.grad for layer in self.layers]
            self._updates.note(grads)
            biases = [layer.bias.grad if layer.bias is not None else None
                      for layer in self.layers]
            values = [layer.value for layer in self.layers]
        else:
            every = [w.grad for layer in self.layers for w in layer.weights]
            self._updates.note(every)
            grads = [joint([w.grad for w in layer.weights]) for layer in self.layers]
            biases = [joint([b.grad for b in layer.biases]) for layer in self.layers]
            values = [joint(layer.values) for layer in self.layers]
        return ([calls[0] if len(calls) == 1 else
                 torch.cat([g.reshape(-1) for g in calls]) if calls else None
                 for calls in self._grad_out] + grads + biases + values)

    def end_passes(self, loss: torch.Tensor | None = None) -> None:
        """The step's backward passes are over: read what is not read yet and keep the step's
        statistics (``after_backward`` without the update's part)."""
        # (no torch.no_grad(): these tensors are gradients and detached weights)
        if self._state == IDLE:
            return
        if self.by_pass:
            self._passes.end()
        else:  # (every call counts)
            self.take(self.traced_items(used_only=False))
        n, row = len(self.layers), self._buffers.host[0][self._row]
        if self._state == READ:  # the norms are in already
            if loss is not None:
                row[4 * n] = loss.detach()
        else:  # one fused norm
            norms_into(row, self._norm_inputs(), (self._buffers.nan if loss is None else loss,))
        self._state = IDLE  # no forward hooks until the next recorded step
        self._numel.append(self._stats.end_step(self._row))
        if self._scaler is not None:
            scale = getattr(self._scaler, "_scale", None)  # (a device tensor: no sync)
            self._scales.append(scale.detach().clone() if isinstance(scale, torch.Tensor)
                                else float(self._scaler.get_scale()))
        self._forget()

    def after_backward(self, loss: torch.Tensor | None = None) -> None:
        """Read the gradients (call after ``backward``, before clipping and the optimizer step);
        ``loss``: the batch loss, if known."""
        if self._state != IDLE:
            self.end_passes(loss)
            self._updates.begin()

    def begin_update(self, optimizer) -> None:
        """Before ``optimizer``'s step in a recorded step: plan (and snapshot for) the update
        of the layers it steps (``watch``, one call per optimizer)."""
        self._updates.begin(optimizer)

    def after_update(self, optimizer=None) -> None:
        """Measure the update the optimizer just made (call right after ``optimizer.step()``)."""
        _, update, applied = self._buffers.host
        self._updates.measure(update[self._row], applied[self._row], optimizer)

    # -- output --------------------------------------------------------------------------------
    def layer_order(self) -> list[int]:
        """Indices into ``layers`` by first call in the forward pass (never called: last)."""
        return self._order + [i for i in range(len(self.layers)) if i not in self._order]

    def pending(self) -> int:
        """The number of recorded steps not yet flushed."""
        return len(self._numel)

    def flush(self, epoch: int = 0) -> pd.DataFrame:
        """Move the buffered rows to the host as a tidy frame (one row per step and layer)."""
        self._stats.flush()
        rows, n = len(self._numel), len(self.layers)  # rows whose gradients were read
        steps = self._steps[:rows]
        # a step begun and not yet read (flush inside a step) moves to the next flush's row 0;
        # an update not yet measured (flush before after_update) stays empty
        self._steps = self._steps[rows:]
        self._row = len(self._steps) - 1
        norms, update, applied, act, counts = self._buffers.take(rows, self._row == 0)
        numel = np.array(self._numel, dtype=np.float64).reshape(rows, n)
        self._numel = []
        if self._scaler is not None:  # the gradient of the real loss, not of the scaled one
            scales = np.array([float(s) for s in self._scales[:rows]], dtype=np.float64)
            self._scales = self._scales[rows:]
            norms[:, :3 * n] /= scales[:, None]
        self._stats.finish(act, counts, numel)
        update = self._updates.take(update, norms[:, n:2 * n])
        order = self.layer_order()
        blocks = np.concatenate([norms[:, b * n:(b + 1) * n][:, order] for b in range(4)], 1)
        return grads_frame(steps, epoch, blocks, norms[:, 4 * n], update[:, order],
                           act[:, order], None,
                           np.array([self.layers[i].units for i in order], dtype=np.float64),
                           self._frame_activations(order),
                           layer_names=[self.names[i] for i in order],
                           applied=applied[:, order], numel=numel[:, order])

    def _frame_activations(self, order: list[int]):
        """The activation after each layer in ``order``; the output layer's dropped where one
        name was given for every layer."""
        activations = [self.layers[i].activation for i in order]
        if isinstance(self._stats, ChunkedStats):
            activations[-1] = None
        elif self._one_activation and self._order:
            activations[len(self._order) - 1] = None  # the output layer: first called last
        return activations

