"""``gradlab.watch``: record any model's gradients around an unmodified training loop, and save
them as a run that ``gradlab ls/plot/report`` and ``gradlab.load`` read.

Step boundaries come from PyTorch's own hooks, so the loop needs no calls:

* the model's forward pre-hook opens a step (the first forward with grad enabled after an
  optimizer step; a forward under ``torch.no_grad()`` - an evaluation - opens none, and further
  forwards before the step, e.g. gradient accumulation, add to the same step);
* during the step, each backward pass's dL/dz wait until the pass ends, and are kept only
  where it made the recorded ``.grad`` (``passes.py``); the norms of dL/dz, of each ``.grad`` and
  of the weights are taken then, before any clipping (where torch has no final callbacks, at
  the optimizer step instead: after clipping);
* the optimizers' step pre-hooks close the step's passes and snapshot weights where needed;
  their step post-hooks measure the update, and the lead optimizer's (the first given, or the
  first to step) closes the step. ``optimizer.step(closure)`` opens the step itself.

Only the step post-hook, which counts steps, stays registered through the block: the others,
and the layers' hooks, are registered when the next step is one to record and removed as the
next unrecorded step opens, so an unrecorded step costs one Python call. Without an optimizer
given, these are torch's global optimizer hooks, and an optimizer counts where it steps one of
the model's parameters.

Step ``s`` is the number of lead-optimizer steps made since ``watch`` was entered. The loss is
not visible to hooks: the ``loss`` column is empty unless ``rec.log(loss=...)`` gives it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .. import compat
from ..store import empty_time, now
from .frames import empty_frame
from .hooks import Hooks
from .metrics import Metrics
from .recorder import GradientRecorder
from .saving import save_run
from .through_time import TimeRecorder


def watch(model: nn.Module, optimizer=None, log_every: int = 10, *, scaler=None,
          activations=None, modules=None, applied_updates: bool = False) -> Watch:
    """Record ``model``'s per-layer gradient statistics every ``log_every`` optimizer steps
    while the ``with`` block runs; no per-step calls (see the module docstring)::

        with gradlab.watch(model, optimizer, log_every=10) as rec:
            ...the training loop...
        frame = rec.flush()
        rec.save("results/mine", name="run-a", config={"lr": 0.1})

    Args:
        model: any ``nn.Module``; under ``torch.compile``, the compiled one (``model =
            torch.compile(model)``, as nanoGPT does): no graph break, and one more graph for
            the recorded steps, compiled at the first (``record.traced``).
        optimizer: the ``torch.optim`` optimizer that updates it, or a list of them; None
            (default): every optimizer that steps the model's parameters, found as they step
            (one created later, or by a trainer, too).
        log_every: record steps 0, N, 2N, … (0: none).
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop: the records are then
            those of the real loss, not the scaled one.
        activations: the activation after each layer (see ``GradientRecorder``): found from the
            model by default; a mapping from layer names to activation names adds to it.
        modules: which modules to record: every ``nn.Linear`` by default; types (e.g.
            ``(nn.Linear, nn.Conv2d)``) or a predicate on qualified names.
        applied_updates: also record ``applied_update_ratio`` (a weight copy per recorded step).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is not a torch.nn.Module: give the model "
                         f"whose layers to record")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's parameters are on the meta device (not materialised): "
                         "move it to a real device (e.g. model.to_empty(device='cpu')) first")
    optimizers = [] if optimizer is None else (
        list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer])
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"optimizer={type(opt).__name__} is not a torch.optim "
                             f"optimizer: use gradlab.GradientRecorder's per-step calls instead")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise ValueError(f"log_every={log_every!r} is invalid: a whole number >= 0")
    if any(is_sharded(m) for m in model.modules()):
        raise ValueError("FSDP is not supported by gradlab.watch (its parameters are shards): "
                         "watch the model unwrapped, or under DistributedDataParallel")
    recorder = GradientRecorder(model, activations, log_every, modules=modules,
                                applied_updates=applied_updates, read_at_backward_end=True,
                                scaler=scaler)
    times = TimeRecorder(compat.uncompiled(model), log_every, modules=modules)
    return Watch(model, optimizers, recorder, times if times else None)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is wrapped by FSDP (either version), by its class names."""
    return any(kind.__name__ in ("FullyShardedDataParallel", "FSDPModule")
               for kind in type(module).__mro__)


class Watch:
    """What ``watch`` returns: a context manager holding the hooks; ``flush`` and ``save``."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                 recorder: GradientRecorder, times: TimeRecorder | None = None):
        # (torch.compile(model): the step opener stays on the compiled module, which runs it
        # before its graph; the layers are the model's, by their own names)
        outer, model = model, compat.uncompiled(model)
        self.model, self.optimizers, self.recorder = model, optimizers, recorder
        self.times = times  # recurrent layers' gradient through time, where there are any
        self._time_frames: list[pd.DataFrame] = []
        self.step = 0  # steps of the lead optimizer made inside the block
        self._open = False  # a step has begun (a forward ran) and not yet ended
        self._recording = False  # ...and it is recorded
        self._row_open = False  # the last recorded step still takes optimizers' updates
        self._lead = optimizers[0] if optimizers else None  # whose steps count
        self.seen: list[torch.optim.Optimizer] = list(optimizers)  # that stepped the model
        self._params = {id(p) for p in model.parameters()}
        self._ours_for: dict[int, tuple[int, bool]] = {}  # id(opt) -> (its groups, ours)
        if optimizers:
            post = [lambda o=o: o.register_step_post_hook(self._after_step) for o in optimizers]
            pre = [lambda o=o: o.register_step_pre_hook(self._before_step) for o in optimizers]
        else:  # every optimizer's steps, those of the model's parameters taken
            post = [lambda: register_optimizer_step_post_hook(self._after_step)]
            pre = [lambda: register_optimizer_step_pre_hook(self._before_step)]
        self._counter = Hooks(post)
        self._armed = Hooks(pre)  # the hooks of a recorded step (with the layers', and:)
        self._opener = Hooks([lambda: outer.register_forward_pre_hook(self._on_forward)])
        self._logging = False  # log was called: the opener stays, to date what is logged
        self._frames: list[pd.DataFrame] = []
        self._metrics = Metrics()
        self._started = now()

    def __enter__(self) -> Watch:
        if self._counter.registered:
            raise RuntimeError("this gradlab.watch is already entered: enter it once (or call "
                               "gradlab.watch again for a second recorder)")
        self.recorder.__enter__()
        if self.times is not None:
            self.times.__enter__()
        self._counter.on()
        self._arm(self.recorder.is_recorded(self.step))
        return self

    def __exit__(self, *exc) -> None:
        self._logging = False
        self._arm(False)
        self._counter.off()
        self.recorder.__exit__(*exc)
        if self.times is not None:
            self.times.__exit__(*exc)

    def _arm(self, on: bool) -> None:
        """Register (or remove) the hooks that record a step: the model's forward pre-hook,
        the optimizers' step pre-hooks and the recorded layers' hooks."""
        self._armed.set(on)
        self._opener.set(on or self._logging)
        self.recorder.hooks(on)

    def _ours(self, optimizer) -> bool:
        """Whether ``optimizer`` steps the model's parameters (always, for those given)."""
        if self.optimizers:
            return True
        groups = len(optimizer.param_groups)
        known = self._ours_for.get(id(optimizer))
        if known is None or known[0] != groups:
            ours = any(id(p) in self._params for g in optimizer.param_groups for p in g["params"])
            known = self._ours_for[id(optimizer)] = (groups, ours)
            if ours and optimizer not in self.seen:
                self.seen.append(optimizer)
        return known[1]

    # -- hooks ---------------------------------------------------------------------------------
    def _open_step(self, closure: bool = False) -> None:
        self._open, self._row_open = True, False
        self._recording = self.recorder.begin_step(self.step)
        if self.times is not None:
            self.times.begin_step(self.step)
        if not self._recording:  # (left registered by the last recorded step)
            self._arm(False)
        elif closure:  # optimizer.step(closure) evaluates it again at trial weights
            self.recorder.first_pass_only()
        self._row_open = self._recording

    def _on_forward(self, module, args) -> None:
        if not self._open and torch.is_grad_enabled():
            self._open_step()

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._ours(optimizer):
            return
        # (torch passes the step's own arguments, the optimizer first)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is not None:  # the forward and backward passes run inside the step
            if not self._open:
                self._open_step(closure=True)
        elif self._recording:
            self._end_passes()
        if self._row_open:
            self.recorder.begin_update(optimizer)

    def _end_passes(self) -> None:
        self.recorder.end_passes()
        if self.times is not None:
            self.times.after_backward()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._ours(optimizer):
            return
        if self._row_open:
            self._end_passes()  # (a closure's step; done already otherwise)
            self.recorder.after_update(optimizer)
        if self._lead is None:
            self._lead = optimizer
        if optimizer is not self._lead:  # a further optimizer of the same step
            return
        self._recording = self._open = False
        self.step += 1
        if self.recorder.is_recorded(self.step):
            self._arm(True)  # (else removed as the next step opens)

    # -- output --------------------------------------------------------------------------------
    def flush(self) -> pd.DataFrame:
        """The tidy frame of the steps recorded since the last flush, one row per (step, layer).

        ``epoch`` is 1 + the number of earlier flushes (flush at each epoch end to number them).
        The frame has no ``run_id`` column (``save`` names the run); ``gradlab.plots`` draws it.
        """
        epoch = len(self._frames) + 1
        frame = self.recorder.flush(epoch=epoch)
        self._frames.append(frame)
        if self.times is not None:
            names = [self.recorder.names[i] for i in self.recorder.layer_order()]
            self._time_frames.append(self.times.flush(epoch, layer_names=names))
        return frame

    def time(self) -> pd.DataFrame:
        """The recurrent layers' gradient through time flushed so far (``time.parquet``'s
        rows, without ``run_id``): one row per (step, layer, t)."""
        frames = [f for f in self._time_frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else empty_time().drop(
            columns="run_id")

    def layers(self) -> list[dict]:
        """The recorded layers in ``layer`` order: layer, layer_name, type, weight shape and the
        activation after it (None where not known)."""
        rec = self.recorder
        return [{"layer": layer, "layer_name": rec.names[i], "type": type(rec.linears[i]).__name__,
                 "shape": [list(w.shape) for w in rec.layers[i].weights]
                 if len(rec.layers[i].weights) > 1 else list(rec.layers[i].weight.shape),
                 "activation": getattr(rec.layers[i].activation, "name", None)}
                for layer, i in enumerate(rec.layer_order())]

    def log(self, split: str = "train", **values) -> None:
        """Record your metrics at this step, e.g. ``rec.log(loss=loss.item())`` in the loop or
        ``rec.log(split="test", accuracy=acc)`` after an evaluation: tidy rows (step, split,
        metric, value), saved as the run's ``metrics.parquet``; a training ``loss`` also fills
        the step's ``loss`` column. A value logged after the forward pass of step s, before or
        after ``optimizer.step()``, belongs to step s; one logged after the last step (an
        evaluation) to that step. A 0-d tensor is fine: it is read at ``save``."""
        self._metrics.log(self._metric_step(), split, values)

    def _metric_step(self) -> int:
        """The step a value logged now belongs to: the open step (its forward pass has run),
        else the step just made. (The model's forward pre-hook, which says so, stays
        registered from the first ``log`` on; before it, an unrecorded step counts as made.)"""
        if not self._logging:
            self._logging = True
            self._opener.on()
        return self.step if self._open else max(self.step - 1, 0)

    def metrics(self) -> pd.DataFrame:
        """The metrics logged so far: one row per (step, split, metric)."""
        return self._metrics.frame()

    def save(self, out, name: str | None = None, config: dict | None = None, *,
             overwrite: bool = False) -> Path:
        """Write everything recorded (flushing what is pending) as a run of the results layout:
        ``<out>/runs/<name>/`` with config.json (``"source": "watch"``; ``config``: yours, whole;
        ``watched``: the recorded layers, the optimizers, and under DDP the world size),
        grads.parquet, metrics.parquet (what ``log`` recorded), an epochs.parquet without rows,
        and status.json last. Returns the run folder. Under DistributedDataParallel rank 0
        writes the run; other ranks write nothing.

        Args:
            out: the results folder.
            name: the run's id (letters, digits, ``.``, ``_``, ``-``); default: a hash of the
                config and what was watched.
            config: your own settings, a dict of JSON scalars (str, int, float, bool, None).
            overwrite: replace a run of that name (else saving under it is refused).
        """
        if self.recorder.pending():
            self.flush()
        frames = [f for f in self._frames if len(f)]
        grads = pd.concat(frames, ignore_index=True) if frames else empty_frame()
        return save_run(self, out, name, config, overwrite, grads, self._metrics.frame(),
                        self.time())
