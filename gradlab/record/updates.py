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
"""

from __future__ import annotations

import numpy as np
import torch

from .. import compat
from .layers import Layer
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


class UpdateMeter:
    """Measures each recorded step's update of the layers' weights (see the module docstring).

    Per step: ``note`` the gradients as they are read, ``begin`` before ``optimizer.step()``
    and ``measure`` after it; ``take`` at a flush."""

    def __init__(self, layers: list[Layer], optimizer, applied: bool):
        self.layers = layers
        self.optimizer = optimizer
        self.applied = applied  # also the update as stored (a snapshot every recorded step)
        self._made_for: object = None  # what the plans below were made for
        self._groups: dict[int, dict] = {}  # id(param) -> its group
        self.plans: list[tuple[int, float]] = []
        self._snapshot_needed = False
        self._before: list[torch.Tensor] | None = None  # the weights before the step
        self._snapshot = False  # this step's weights were snapshotted
        self._read: list[tuple] = []  # (.grad, its version) of each weight, as read
        self.modes: list[list[int]] = []  # per recorded row
        self.scales: list[list[float]] = []
        self.pending = False  # begun, not yet measured

    def note(self, grads: list[torch.Tensor | None]) -> None:
        """The weights' ``.grad`` as read, to see later whether clipping changed them."""
        self._read = list(zip(grads, map(compat.version, grads)))

    def _replan(self) -> None:
        groups = self.optimizer.param_groups if self.optimizer is not None else ()
        sgd = type(self.optimizer) is torch.optim.SGD
        # an SGD plan changes with its groups' settings (a scheduler's new lr, say)
        made_for = [len(groups)] + ([(g["lr"], g["momentum"], g["weight_decay"], g["nesterov"])
                                     for g in groups] if sgd else [])
        if made_for == self._made_for:
            return
        if len(groups) != (self._made_for or [-1])[0]:  # (groups added): the map anew
            self._groups = {id(p): g for g in groups for p in g["params"]}
        self._made_for = made_for
        found = [self._groups.get(id(layer.weight)) for layer in self.layers]
        self.plans = [plan(self.optimizer, layer.weight, group)
                      for layer, group in zip(self.layers, found, strict=True)]
        self._snapshot_needed = self.applied or any(
            needs_snapshot(mode, group)
            for (mode, _), group in zip(self.plans, found, strict=True))

    def begin(self) -> None:
        """Before the optimizer's step: make the plans, snapshot the weights where needed."""
        self._replan()
        self.modes.append([mode for mode, _ in self.plans])  # (measure may change a mode)
        self.scales.append([scale for _, scale in self.plans])
        self._snapshot = self._snapshot_needed
        if self._snapshot:
            values = [layer.value for layer in self.layers]
            if self._before is None:
                self._before = [torch.empty_like(v) for v in values]
            compat.foreach_copy_(self._before, values)
        self.pending = True

    def measure(self, update_out, applied_out) -> None:
        """After the optimizer's step: the update norms into this row's ``update_out`` (and
        ``applied_out``), where a tensor is needed."""
        if not self.pending:
            return
        self.pending = False
        modes = self.modes[-1]
        values = [layer.value for layer in self.layers]
        deltas = (compat.foreach_sub(values, self._before) if self._snapshot
                  else [None] * len(values))
        state = self.optimizer.state if self.optimizer is not None else {}
        tensors: list[torch.Tensor | None] = []
        for i, (layer, (mode, _)) in enumerate(zip(self.layers, self.plans, strict=True)):
            grad, version = self._read[i]
            weight = layer.weight
            if mode == SNAPSHOT:
                tensors.append(deltas[i])
            elif mode == FROM_GRAD_NORM and weight.grad is grad and (
                    grad is None or compat.version(grad) == version):
                tensors.append(None)  # the recorded gradient norm is the update's
            else:
                modes[i] = FROM_TENSORS  # e.g. clipped: measure what was applied
                group = self._groups[id(weight)]
                before = self._before[i] if self._snapshot else None
                tensors.append(None if weight.grad is None
                               else sgd_direction(weight, before, group, state))
        if any(t is not None for t in tensors):
            norms_into(update_out, tensors)
        if self.applied:
            norms_into(applied_out, deltas)
        self._read = []

    def take(self, update: np.ndarray, grad_weight: np.ndarray) -> np.ndarray:
        """‖ΔW‖ per flushed row and layer, from the measured ``update`` and the recorded
        ‖∂L/∂W‖ (rows, n); forgets the rows (and an update begun and not measured)."""
        rows, n = update.shape
        modes = np.array(self.modes, dtype=np.int64).reshape(rows, n)
        scales = np.array(self.scales, dtype=np.float64).reshape(rows, n)
        self.modes, self.scales, self.pending = [], [], False
        return np.where(modes == FROM_GRAD_NORM, grad_weight, update) * scales
