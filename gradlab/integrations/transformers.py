"""``GradlabCallback`` for the Hugging Face ``transformers.Trainer``: records the model's layers
and what the Trainer logs through ``trainer.train()``, and saves it as one gradlab run (extra
``gradlab[transformers]``).

Each ``on_log`` is logged at the optimizer step just made (``rec.log``'s rule): a name
``eval_loss`` or ``test_accuracy`` (the prefixes of ``Trainer.evaluate`` and ``predict``) gives
the split (``eval``, ``test``) and the metric (``loss``, ``accuracy``); every other name is kept
whole under ``train`` (``loss``, ``grad_norm``, ``learning_rate``, and the run's summary
``train_loss``, ``train_runtime``…); ``epoch``, the Trainer's progress counter, is left out.
The Trainer's ``loss`` is the mean over its last ``logging_steps`` steps: with
``logging_steps=1`` it is the step's loss, and fills the step's ``loss`` column.
"""

from __future__ import annotations

from .common import Recorded, Recording, framework

transformers = framework(("transformers",), "transformers", "gradlab.integrations.transformers")

SPLITS = ("eval", "test")
# TrainingArguments saved in the run's config (each a JSON scalar or an enum)
ARGUMENTS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
             "num_train_epochs", "max_steps", "weight_decay", "max_grad_norm",
             "lr_scheduler_type", "optim", "seed")


class GradlabCallback(transformers.TrainerCallback, Recorded):
    """Record ``trainer.train()`` with ``gradlab.watch`` and save it as run ``name`` of
    ``out``::

        trainer = Trainer(model, args, train_dataset=train,
                          callbacks=[GradlabCallback("results/hf", log_every=10)])
        trainer.train()
        gradlab.load("results/hf")   # .grads, .metrics, .runs

    Args:
        out: the results folder.
        log_every: record optimizer steps 0, N, 2N, … (0: none).
        name: the run's id; default: a hash of its config and what was watched (see
            ``Watch.save``). A second run under one name is refused unless ``overwrite``.
        modules, activations, applied_updates: as ``gradlab.watch`` takes them (default: every
            ``nn.Linear``; GPT-2's ``Conv1D`` layers are not among the types recorded).
        config: your settings, JSON scalars, saved over the ones the callback finds: ``model``
            (the model's class name), ``model_type`` and the main ``TrainingArguments``.
        overwrite: replace a saved run of that name.

    Every process records; the main one saves the run. After training ``callback.rec`` is its
    ``Watch`` and ``callback.path`` the run folder.
    """

    def __init__(self, out, log_every: int = 10, name: str | None = None, modules=None,
                 activations=None, *, applied_updates: bool = False, config=None,
                 overwrite: bool = False):
        self.recording = Recording(out, log_every, name, config, overwrite, modules=modules,
                                   activations=activations, applied_updates=applied_updates)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.recording.begin(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: v for k, v in (logs or {}).items() if k != "epoch"}
        self.recording.log(values, SPLITS, "train")

    def on_epoch_end(self, args, state, control, **kwargs):
        self.recording.flush()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        settings = {"model": type(model).__name__ if model is not None else None,
                    "model_type": getattr(getattr(model, "config", None), "model_type", None),
                    **{a: getattr(args, a, None) for a in ARGUMENTS}}
        self.recording.end(state.is_world_process_zero, settings)
