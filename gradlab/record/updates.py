"""``update_ratio``'s numerator: the norm of the update the optimizer makes at a recorded step.

By default the weights are snapshotted before the step and differenced after it (the update as
applied; any optimizer). ``torch.optim.SGD`` has a shortcut that is exact where a snapshot is
not: its update is -lr times a direction read from ``.grad`` and its state (the gradient, plus
weight decay · W, the momentum buffer, or for Nesterov gradient + momentum · buffer; negated
under ``maximize``), taken before the new weights are rounded to their dtype - so where lr·g is
far below the weights' float spacing it is still the intended update, not rounding noise. With
neither momentum nor weight decay no tensor is needed at all: ‖ΔW‖ = lr · the recorded
‖∂L/∂W‖, unless the gradient was changed (clipped) after it was read. (Measured to matter: on
the tutorial net a snapshot and its difference cost 0.94 ms a recorded step, a third of the
step; the shortcut costs nothing. AMD EPYC, 1 thread.)

A layer of several weight matrices (a recurrent module) is measured over all of them: ‖ΔW‖ is
their joint norm (``layers.joint``), by SGD's shortcut where all are in one parameter group,
else by a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import compat
from .layers import Layer, joint
from .norms import norms_into

SNAPSHOT, FROM_GRAD_NORM, FROM_TENSORS = 0, 1, 2  # how a layer's update is measured


def plan(optimizer, weight: torch.Tensor, group: dict | None) -> tuple[int, float]:
    """``(mode, scale)``: how the update of ``weight`` is measured, and the factor (SGD's lr)
    its norm is scaled by."""
    if type(optimizer) is not torch.optim.SGD or group is None or isinstance(
            group["lr"], torch.Tensor):
        return SNAPSHOT, 1.0
    if group["momentum"] == 0 and group["weight_decay"] == 0:
        return FROM_GRAD_NORM, group["lr"]
    return FROM_TENSORS, group["lr"]


def needs_snapshot(mode: int, group: dict | None) -> bool:
    """Whether measuring in ``mode`` needs the weights before the step (SGD's weight decay
    term, unless the momentum buffer already holds it)."""
    return mode == SNAPSHOT or (mode == FROM_TENSORS and group["weight_decay"] != 0
                                and (group["nesterov"] or group["momentum"] == 0))


def sgd_direction(weight: torch.nn.Parameter, before: torch.Tensor | None, group: dict,
                  state: dict) -> torch.Tensor:
    """The direction SGD just applied to ``weight`` (its update is -lr times it), as
    ``torch.optim.SGD`` computes it (``_single_tensor_sgd``)."""
    momentum = group["momentum"]
    if momentum != 0 and not group["nesterov"]:
        return state[weight]["momentum_buffer"]
    direction = -weight.grad if group.get("maximize", False) else weight.grad
    if group["weight_decay"] != 0:
        direction = direction + group["weight_decay"] * before
    if momentum != 0:
        direction = direction + momentum * state[weight]["momentum_buffer"]
    return direction


def layer_group(layer: Layer, by_param: dict[int, dict]) -> tuple[dict | None, bool]:
    """The parameter group of a layer's weights (None: no group holds them), and whether it
    holds all of them (a recurrent layer's matrices could be split between groups)."""
    groups = [by_param.get(id(w)) for w in layer.weights]
    first = next((g for g in groups if g is not None), None)
    return first, all(g is first for g in groups)


NOT_STEPPED = -1  # no optimizer stepped the layer at this step: its update_ratio is empty


@dataclass
class Plans:
    """How one optimizer's layers are measured, and what the plans were made for."""

    made_for: list
    layers: list[int]  # indices of the layers it steps
    plans: list[tuple[int, float]]
    groups: dict[int, dict]  # id(param) -> its group
    snapshot: bool  # whether measuring needs the weights before the step


class UpdateMeter:
    """Measures each recorded step's update of the layers' weights (see the module docstring),
    each layer by the optimizer that steps it.

    Per step: ``open_row``; ``note`` the gradients as they are read; for each optimizer that
    steps, ``begin`` before its step and ``measure`` after it; ``take`` at a flush."""

    def __init__(self, layers: list[Layer], optimizer, applied: bool):
        self.layers = layers
        self.optimizer = optimizer  # the default: the explicit protocol's
        self.applied = applied  # also the update as stored (a snapshot every recorded step)
        self._plans: dict[int, Plans] = {}  # per optimizer (by id)
        # per layer: its weights before a step
        self._before: list[list[torch.Tensor] | None] = [None] * len(layers)
        self._pending: dict[int, tuple[Plans, bool]] = {}  # begun: (plans, snapshot taken)
        self._read: list[list[tuple]] = []  # per layer: (.grad, its version) of each weight
        self.modes: list[list[int]] = []  # per recorded row
        self.scales: list[list[float]] = []

    def open_row(self) -> None:
        """A new recorded row: no layer stepped yet."""
        self.modes.append([NOT_STEPPED] * len(self.layers))
        self.scales.append([1.0] * len(self.layers))

    def drop_row(self) -> None:
        """Forget the last row (a step begun and never read)."""
        self.modes.pop()
        self.scales.pop()

    def note(self, grads: list[torch.Tensor | None]) -> None:
        """The weights' ``.grad`` as read (every layer's ``weights`` in turn), to see later
        whether clipping changed them."""
        read = list(zip(grads, map(compat.version, grads)))
        self._read = ([[r] for r in read] if len(read) == len(self.layers) else
                      [[read.pop(0) for _ in layer.weights] for layer in self.layers])

    def _unchanged(self, i: int) -> bool:
        """Whether layer ``i``'s ``.grad`` are those read, unchanged (not clipped, not set)."""
        if not self._read:
            return False
        read = self._read[i]
        if len(read) == 1:  # (the common case, without a generator: it runs per layer)
            grad, version = read[0]
            return self.layers[i].weight.grad is grad and (
                grad is None or compat.version(grad) == version)
        return all(w.grad is grad and (grad is None or compat.version(grad) == version)
                   for w, (grad, version) in zip(self.layers[i].weights, read, strict=True))

    def _plans_of(self, optimizer) -> Plans:
        groups = optimizer.param_groups if optimizer is not None else ()
        sgd = type(optimizer) is torch.optim.SGD
        # an SGD plan changes with its groups' settings (a scheduler's new lr, say)
        made_for = [len(groups)] + ([(g["lr"], g["momentum"], g["weight_decay"], g["nesterov"])
                                     for g in groups] if sgd else [])
        known = self._plans.get(id(optimizer))
        if known is not None and known.made_for == made_for:
            return known
        by_param = (known.groups if known is not None and known.made_for[0] == len(groups)
                    else {id(p): g for g in groups for p in g["params"]})
        found, whole = zip(*(layer_group(layer, by_param) for layer in self.layers))
        # without an optimizer every layer is snapshotted; with one, only those it steps
        chosen = [i for i, group in enumerate(found) if optimizer is None or group is not None]
        # (a layer whose matrices are in several groups: snapshotted)
        plans = [plan(optimizer if whole[i] else None, self.layers[i].weight, found[i])
                 for i in chosen]
        snapshot = self.applied or any(needs_snapshot(mode, found[i])
                                       for i, (mode, _) in zip(chosen, plans, strict=True))
        known = self._plans[id(optimizer)] = Plans(made_for, chosen, plans, by_param, snapshot)
        return known

    def begin(self, optimizer=None) -> None:
        """Before ``optimizer``'s step (default: the one given): plan its layers' measurement
        in this row, snapshot their weights where needed."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        known = self._plans_of(optimizer)
        modes, scales = self.modes[-1], self.scales[-1]
        for i, (mode, scale) in zip(known.layers, known.plans, strict=True):
            modes[i], scales[i] = mode, scale
        if known.snapshot:
            if any(self._before[i] is None for i in known.layers):
                for i in known.layers:
                    self._before[i] = [torch.empty_like(v) for v in self.layers[i].values]
            compat.foreach_copy_(self._all(self._before, known.layers),
                                 self._all([layer.values for layer in self.layers], known.layers))
        self._pending[id(optimizer)] = (known, known.snapshot)

    def measure(self, update_out, applied_out, optimizer=None) -> None:
        """After ``optimizer``'s step: the update norms of its layers into this row's
        ``update_out`` (and ``applied_out``), where a tensor is needed."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        pending = self._pending.pop(id(optimizer), None)
        if pending is None:
            return
        known, snapshot = pending
        modes = self.modes[-1]
        deltas = [[None]] * len(known.layers)  # (read only where snapshot)
        if snapshot:
            found = iter(compat.foreach_sub(
                self._all([layer.values for layer in self.layers], known.layers),
                self._all(self._before, known.layers)))
            deltas = [[next(found) for _ in self.layers[i].weights] for i in known.layers]
        state = optimizer.state if optimizer is not None else {}
        tensors: list[torch.Tensor | None] = []
        for k, (i, (mode, _)) in enumerate(zip(known.layers, known.plans, strict=True)):
            layer = self.layers[i]
            if mode == SNAPSHOT:
                tensors.append(joint(deltas[k]))
            elif mode == FROM_GRAD_NORM and self._unchanged(i):
                tensors.append(None)  # the recorded gradient norm is the update's
            else:
                modes[i] = FROM_TENSORS  # e.g. clipped: measure what was applied
                before = self._before[i] if snapshot else [None] * len(layer.weights)
                tensors.append(joint([
                    None if w.grad is None else
                    sgd_direction(w, b, known.groups[id(w)], state)
                    for w, b in zip(layer.weights, before, strict=True)]))
        if any(t is not None for t in tensors):
            _norms_at(update_out, known.layers, tensors, len(self.layers))
        if self.applied:
            _norms_at(applied_out, known.layers, [joint(d) for d in deltas], len(self.layers))

    @staticmethod
    def _all(per_layer: list[list[torch.Tensor]], layers: list[int]) -> list[torch.Tensor]:
        """The tensors of ``layers``, one list (for the fused foreach operations)."""
        return [t for i in layers for t in per_layer[i]]

    def take(self, update: np.ndarray, grad_weight: np.ndarray) -> np.ndarray:
        """‖ΔW‖ per flushed row and layer, from the measured ``update`` and the recorded
        ‖∂L/∂W‖ (rows, n); forgets those rows (a row begun and not yet flushed stays)."""
        rows, n = update.shape
        modes = np.array(self.modes[:rows], dtype=np.int64).reshape(rows, n)
        scales = np.array(self.scales[:rows], dtype=np.float64).reshape(rows, n)
        self.modes, self.scales = self.modes[rows:], self.scales[rows:]
        self._pending = {}  # (an update begun and not yet measured stays empty)
        measured = np.where(modes == FROM_GRAD_NORM, grad_weight, update) * scales
        return np.where(modes == NOT_STEPPED, np.nan, measured)


def _norms_at(out, layers: list[int], tensors: list, n: int) -> None:
    """``norms_into`` for some of a row's layers: the whole row where they are all."""
    if len(layers) == n:
        norms_into(out, tensors)
        return
    part = (np.empty(len(layers)) if isinstance(out, np.ndarray)
            else out.new_empty(len(layers)))
    norms_into(part, tensors)
    out[layers] = part if isinstance(out, np.ndarray) else part.to(out.dtype)
