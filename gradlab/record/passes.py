"""Which backward passes make a step's gradient: ``watch`` counts a pass's dL/dz and the forward
calls it used only where the pass accumulates into the recorded layers' ``.grad``, and only the
passes since that gradient was last zeroed.

So a GAN generator's loss back-propagated through the discriminator, or a pass of
``torch.autograd.grad`` (a gradient penalty), or a forward that no backward pass uses (an
evaluation with grad enabled) adds nothing to the discriminator's step; the passes of a step
that ``torch.amp.GradScaler`` skips are replaced by the next step's once it zeroes the
gradient.

How: on a recorded step each recorded weight carries two hooks: a tensor hook, which runs
before autograd adds a pass's gradient into ``.grad`` and notes what ``.grad`` was then, and a
post-accumulate hook, which says the pass did accumulate. A pass's dL/dz wait in a list until
the pass ends (autograd's final callback, after DistributedDataParallel's, so that ``.grad`` is the
synchronised gradient on every rank): then they are taken (``GradientRecorder.take``) or
dropped, and where ``.grad`` was not what the last taken pass left (zeroed, or set anew), the
step begins again from this pass.
"""

from __future__ import annotations

import warnings

import torch

from .. import compat


def fingerprint(grad: torch.Tensor | None) -> tuple | None:
    """What identifies a ``.grad`` and its contents: the tensor and its in-place version."""
    return None if grad is None else (id(grad), compat.version(grad))


class Passes:
    """The backward passes of a recorder's current step (see the module docstring)."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.items: list[tuple] = []  # this pass's (layer, dL/dz, forward call)
        self.before: dict[int, tuple | None] = {}  # id(weight) -> .grad before this pass
        self.accumulated = False  # this pass added into a recorded .grad
        self.taken: dict[int, tuple | None] = {}  # id(weight) -> .grad after the last pass taken
        self.queued = False  # the end of this pass is awaited
        self.first_only = False  # take only the step's first pass (a closure's re-evaluations)
        self.seen = False  # a pass was taken in this step
        self.warned = False

    def registrations(self) -> list:
        """The weights' hooks, for the recorder's ``Hooks``."""
        out = []
        for layer in self.recorder.layers:
            weight = layer.weight
            out.append(lambda w=weight: w.register_hook(self._before_hook(w)))
            out.append(lambda w=weight: w.register_post_accumulate_grad_hook(self._accumulated))
        return out

    def begin(self) -> None:
        self.items, self.before, self.accumulated = [], {}, False
        self.first_only, self.seen = False, False

    def _before_hook(self, weight):
        def hook(grad):  # before autograd adds this pass's gradient into weight.grad
            self.before.setdefault(id(weight), fingerprint(weight.grad))
            self._await_end()
        return hook

    def _accumulated(self, weight) -> None:
        self.accumulated = True

    def received(self, index: int, call, grad: torch.Tensor) -> None:
        """A dL/dz hook: layer ``index``'s gradient in this pass, of forward ``call``."""
        self.items.append((index, grad, call))
        if not self._await_end():  # (no final callbacks in this torch: taken as they come)
            self._take_as_is()

    def _take_as_is(self) -> None:
        """Take the pass's items without knowing whether it makes ``.grad`` (no final
        callbacks in this torch)."""
        self.recorder.take(self.items)
        self.items = []
        self.seen = True

    def _await_end(self) -> bool:
        if not self.queued:
            self.queued = compat.at_backward_end(self._last)
        return self.queued

    def _last(self) -> None:
        # queued again, to run after every callback queued in this pass: DistributedDataParallel
        # writes the synchronised gradient into .grad in one, and that is the gradient to read
        if not compat.at_backward_end(self._ended):
            self._ended()

    def _ended(self) -> None:
        items, self.items = self.items + self.recorder.traced_items(), []
        before, self.before = self.before, {}
        accumulated, self.accumulated = self.accumulated, False
        self.queued = False
        if not accumulated or (self.first_only and self.seen):
            return  # torch.autograd.grad, or a pass that does not reach the weights
        recorder = self.recorder
        if any(fp != self.taken.get(key) for key, fp in before.items()):
            recorder.restart()  # the gradient was zeroed since: a new one begins here
        recorder.take(items)
        self.taken = {id(layer.weight): fingerprint(layer.weight.grad)
                      for layer in recorder.layers}
        self.seen = True
        recorder.read_gradients()

    def end(self) -> None:
        """The step's passes are over (its optimizer steps)."""
        if self.items:  # a pass not yet ended (no final callbacks): taken as it is
            self._take_as_is()
        if not self.seen and not self.warned and any(
                layer.weight.grad is not None for layer in self.recorder.layers):
            self.warned = True  # (once per run)
            warnings.warn("gradlab: the gradient of a recorded step was not made by a backward "
                          "pass that gradlab saw (set by hand, or by torch.autograd.grad): its "
                          "dL/dz and f' columns are left empty", stacklevel=2)
