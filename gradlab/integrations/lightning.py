"""``GradlabCallback`` for Lightning: records a LightningModule's layers and the metrics it logs
through a fit, and saves the fit as one gradlab run (extra ``gradlab[lightning]``).

Metrics are read from ``trainer.callback_metrics`` after each training batch, at each
validation end and at each epoch's start and end. Lightning stores a value in a new tensor each
time it is logged (or an epoch's mean is computed), and hands out views of that tensor until
then, so the callback logs exactly the entries whose memory is new since its last read, at the
optimizer step just made (``rec.log``'s rule). A name
``train_loss``, ``val_loss`` or ``test/acc`` gives the split (``train``, ``val``, ``test``, also
``valid``, ``validation``, ``eval``) and the metric (``loss``, ``acc``); any other name is kept
whole, under ``val`` when read at a validation end and ``train`` otherwise. Where a value is
logged both per step and per epoch, Lightning's own names for the two (``loss_step``,
``loss_epoch``) are kept. When the module logs no training ``loss`` at a step, the loss its
``training_step`` returns is logged as ``train`` ``loss``: it fills the step's ``loss`` column.
"""

from __future__ import annotations

import torch

from .common import Recorded, Recording, framework, split_metric

pl = framework(("lightning.pytorch", "pytorch_lightning"), "lightning",
               "gradlab.integrations.lightning")

SPLITS = ("train", "val", "valid", "validation", "test", "eval")


class GradlabCallback(pl.Callback, Recorded):
    """Record ``trainer.fit`` with ``gradlab.watch`` and save it as run ``name`` of ``out``::

        trainer = lightning.Trainer(callbacks=[GradlabCallback("results/lit", log_every=10)])
        trainer.fit(module, train_loader, val_loader)
        gradlab.load("results/lit")   # .grads, .metrics, .runs

    Args:
        out: the results folder.
        log_every: record optimizer steps 0, N, 2N, … of each fit (0: none).
        name: the run's id; default: a hash of its config and what was watched (see
            ``Watch.save``). A second fit under one name is refused unless ``overwrite``.
        modules, activations, applied_updates: as ``gradlab.watch`` takes them (default: every
            ``nn.Linear`` of the module, activations found from it).
        config: your settings, JSON scalars, saved over the ones the callback finds: ``model``
            (the module's class name) and the module's scalar ``hparams``
            (``save_hyperparameters``; a list of scalars as ``"32,32"``).
        overwrite: replace a saved run of that name.

    The records are on every rank; rank 0 saves the run. After the fit ``callback.rec`` is the
    fit's ``Watch`` and ``callback.path`` the run folder.
    """

    def __init__(self, out, log_every: int = 10, name: str | None = None, modules=None,
                 activations=None, *, applied_updates: bool = False, config=None,
                 overwrite: bool = False):
        super().__init__()
        self.recording = Recording(out, log_every, name, config, overwrite, modules=modules,
                                   activations=activations, applied_updates=applied_updates)
        self._seen: dict[str, object] = {}  # metric name -> the value read last

    # -- the fit -------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._seen = dict(trainer.callback_metrics)  # what an earlier fit logged is not new
        self.recording.begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = self._read(trainer, "train")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and ("train", "loss") not in logged:
            self.recording.log({"loss": loss.detach()}, SPLITS, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._read(trainer, "val")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._read(trainer, "train")  # what the module logged in its on_train_epoch_end

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._read(trainer, "train")
        self.recording.flush()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._read(trainer, "train")
        hparams = dict(getattr(pl_module, "hparams", None) or {})
        self.recording.end(trainer.is_global_zero,
                           {"model": type(pl_module).__name__, **hparams})

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.recording.abort()

    # -- metrics -------------------------------------------------------------------------------
    def _read(self, trainer, default: str) -> set[tuple[str, str]]:
        """Log the entries of ``trainer.callback_metrics`` that are new since the last read;
        returns their (split, metric) pairs."""
        fresh: dict[tuple, list[str]] = {}
        metrics = trainer.callback_metrics
        for name, value in metrics.items():
            if name not in self._seen or memory(self._seen[name]) != memory(value):
                fresh.setdefault(memory(value), []).append(name)
        # (holds the tensors read: their memory is not reused while it is compared with)
        self._seen = dict(metrics)
        values = {}
        for names in fresh.values():
            # one tensor under "x" and "x_step" (or "x_epoch"): Lightning's forked name only
            forked = [n for n in names if n.endswith(("_step", "_epoch"))]
            for name in forked or names:
                value = metrics[name]
                # a copy: Lightning may reuse the tensor; read at save, so no sync per step
                values[name] = value.detach().clone() if hasattr(value, "detach") else value
        self.recording.log(values, SPLITS, default)
        return {split_metric(name, SPLITS, default) for name in values}


def memory(value) -> tuple:
    """Where a tensor's values live (a view shares it with its base); an object's identity."""
    if isinstance(value, torch.Tensor):
        return (str(value.device), value.untyped_storage().data_ptr(), value.storage_offset())
    return ("object", id(value))
