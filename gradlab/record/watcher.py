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
not visible to hooks: the ``loss`` column is empty in these records.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ..store import EPOCH_COLUMNS, close_run, ensure_out, now, open_run, provenance, run_dir
from .frames import empty_frame
from .hooks import Hooks
from .recorder import GradientRecorder

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def watch(model: nn.Module, optimizer=None, log_every: int = 10, *, scaler=None,
          activations=None, modules=None, applied_updates: bool = False) -> Watch:
    """Record ``model``'s per-layer gradient statistics every ``log_every`` optimizer steps
    while the ``with`` block runs; no per-step calls (see the module docstring)::

        with gradlab.watch(model, optimizer, log_every=10) as rec:
            ...the training loop...
        frame = rec.flush()
        rec.save("results/mine", name="run-a", config={"lr": 0.1})

    Args:
        model: any ``nn.Module``.
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
    return Watch(model, optimizers, recorder)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is wrapped by FSDP (either version), by its class names."""
    return any(kind.__name__ in ("FullyShardedDataParallel", "FSDPModule")
               for kind in type(module).__mro__)


class Watch:
    """What ``watch`` returns: a context manager holding the hooks; ``flush`` and ``save``."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                 recorder: GradientRecorder):
        self.model, self.optimizers, self.recorder = model, optimizers, recorder
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
        self._armed = Hooks([  # the hooks of a recorded step (with the layers')
            lambda: model.register_forward_pre_hook(self._on_forward), *pre])
        self._frames: list[pd.DataFrame] = []
        self._started = now()

    def __enter__(self) -> Watch:
        self.recorder.__enter__()
        self._counter.on()
        self._arm(self.recorder.is_recorded(self.step))
        return self

    def __exit__(self, *exc) -> None:
        self._arm(False)
        self._counter.off()
        self.recorder.__exit__(*exc)

    def _arm(self, on: bool) -> None:
        """Register (or remove) the hooks that record a step: the model's forward pre-hook,
        the optimizers' step pre-hooks and the recorded layers' hooks."""
        self._armed.set(on)
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
            self.recorder.end_passes()
        if self._row_open:
            self.recorder.begin_update(optimizer)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._ours(optimizer):
            return
        if self._row_open:
            self.recorder.end_passes()  # (a closure's step; done already otherwise)
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
        frame = self.recorder.flush(epoch=len(self._frames) + 1)
        self._frames.append(frame)
        return frame

    def layers(self) -> list[dict]:
        """The recorded layers in ``layer`` order: layer, layer_name, type and weight shape."""
        rec = self.recorder
        return [{"layer": layer, "layer_name": rec.names[i], "type": type(rec.linears[i]).__name__,
                 "shape": list(rec.linears[i].weight.shape)}
                for layer, i in enumerate(rec.layer_order())]

    def save(self, out, name: str | None = None, config: dict | None = None) -> Path:
        """Write everything recorded (flushing what is pending) as a run of the results layout:
        ``<out>/runs/<name>/`` with config.json (``"source": "watch"``; the config is yours plus
        ``model``, the recorded layers, and ``optimizer``), grads.parquet, an epochs.parquet
        without rows, and status.json last. Returns the run folder. Under torch.distributed
        (DDP) rank 0 writes the run, with ``world_size`` in its config; other ranks write nothing.

        Args:
            out: the results folder.
            name: the run's id (letters, digits, ``.``, ``_``, ``-``); default: a hash of the
                config, model and optimizer.
            config: your own settings, a dict of JSON scalars (str, int, float, bool, None).
        """
        settings = check_config(config or {})
        world = (torch.distributed.get_world_size()
                 if torch.distributed.is_available() and torch.distributed.is_initialized()
                 else 1)
        if world > 1:  # one run, written by rank 0 (every rank's .grad is the same)
            settings["world_size"] = world
        described = [describe_optimizer(o) for o in self.seen]
        settings.update(model=self.layers(),
                        optimizer=described[0] if len(described) == 1 else described)
        if name is None:
            payload = json.dumps(settings, sort_keys=True, default=str)
            name = hashlib.sha256(payload.encode()).hexdigest()[:12]
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"name={name!r} is invalid: 1-100 letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit")
        if self.recorder.pending():
            self.flush()
        frames = [f for f in self._frames if len(f)]
        grads = pd.concat(frames, ignore_index=True) if frames else empty_frame()
        device = str(self.recorder.linears[0].weight.device)
        path = run_dir(out, name)
        if world > 1 and torch.distributed.get_rank() != 0:
            return path  # (rank 0 writes it)
        path = open_run(ensure_out(out), name, {
            "source": "watch", "config": settings,
            "provenance": {**provenance(device), "started": self._started}})
        close_run(path, name, {
            "grads": grads.drop(columns="run_id", errors="ignore"),
            "epochs": pd.DataFrame(columns=list(EPOCH_COLUMNS))},
            {"steps": self.step, "seconds": None, "final_test_accuracy": None,
             "diverged_step": None, "error": None})
        return path


def check_config(config: dict) -> dict:
    """A copy of the user's config, checked: string keys (not ``model`` or ``optimizer``, which
    ``save`` fills in) and JSON scalar values."""
    if not isinstance(config, dict):
        raise ValueError(f"config={config!r} is invalid: give a dict of JSON scalars")
    for key, value in config.items():
        if not isinstance(key, str) or key in ("model", "optimizer"):
            raise ValueError(f"config key {key!r} is invalid: a string other than 'model' and "
                             f"'optimizer' (save fills those in)")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"config[{key!r}]={value!r} is invalid: a str, int, float, bool "
                             f"or None")
    return dict(config)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's type and each parameter group's scalar settings."""
    groups = [{k: v for k, v in group.items()
               if k != "params" and (v is None or isinstance(v, (str, int, float, bool)))}
              for group in optimizer.param_groups]
    return {"type": type(optimizer).__name__, "param_groups": groups}
