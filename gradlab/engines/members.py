"""Training with the stacked engine: ``train_members`` trains runs that differ only in seed
together (one member is a solo run of ``--engine fused``), with the engine's own batching and
evaluation; ``gradlab.train.Bookkeeping`` does the epoch ends, as for the autograd loop."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from ..config import RunConfig
from ..data import Data, Split, batch_order
from ..record import recorded_steps
from ..train import EVAL_BATCH, Bookkeeping, RunResult, evaluate, seconds_since, seeded_model
from .batches import gather_batches, nonzero_fraction
from .stacked import StackedMLP

# On a CPU the stacked engine evaluates 2,000 rows at a time: each layer's output (2 MB at
# width 256) then stays near the core (the same values up to float rounding as 10,000).
CPU_EVAL_BATCH = 2_000


def train_one(config: RunConfig, data: Data, device: torch.device, *, progress: bool = False,
              on_epoch: Callable[[dict], None] | None = None,
              on_step: Callable[[int, int], None] | None = None) -> RunResult:
    """One run of ``--engine fused``: an ensemble of one member."""
    return train_members([config], data, device, progress=progress, on_epoch=on_epoch,
                         on_step=on_step)[0]


def evaluators(engine: StackedMLP, models: list, test: Split, device: torch.device) -> list:
    """Per member, its (test loss, accuracy) now: with the sparse first layer over the test
    set's nonzeros (listed once, for every evaluation), else the plain ``evaluate``."""
    batch = CPU_EVAL_BATCH if device.type == "cpu" else EVAL_BATCH
    if not engine.sparse:
        return [functools.partial(evaluate, model, test, batch) for model in models]
    first_layers = engine.first_layers(test.x)

    def forward(model, first_layer, start: int, stop: int) -> torch.Tensor:
        return model[1:](first_layer(start, stop))

    return [functools.partial(evaluate, model, test, batch,
                              functools.partial(forward, model, first_layer))
            for model, first_layer in zip(models, first_layers, strict=True)]


def train_members(
    configs: list[RunConfig],
    data: Data,
    device: torch.device,
    *,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[RunResult]:
    """Train configurations that differ only in ``seed`` together, as one ``StackedMLP``.

    Each member has its own initialisation and its own batch order from its seed, exactly as
    when trained alone; a member that diverges stops being recorded and evaluated at the end of
    that epoch (its arithmetic goes on, unseen, until all members are done). ``seconds`` is the
    wall time of the joint epoch.
    """
    config = configs[0]
    models = [seeded_model(c, device) for c in configs]
    n = len(data.train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = recorded_steps(total, config.log_every, config.log_spaced)
    per_epoch = np.bincount(schedule // steps_per_epoch, minlength=config.epochs)
    engine = StackedMLP(models, config.activation, batch_size=config.batch_size,
                        optimizer=config.optimizer, lr=config.lr,
                        momentum=config.momentum, weight_decay=config.weight_decay,
                        clip_grad_norm=config.clip_grad_norm, max_rows=int(per_epoch.max()),
                        input_density=nonzero_fraction(data.train.x))
    prepare = engine.list_nonzeros if engine.sparse else None
    recorded = set(schedule.tolist())
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    book = Bookkeeping(configs, models, data, on_epoch, progress, total, on_step,
                       evaluators(engine, models, data.test, device))
    step = 0
    train_x, train_y = data.train.x, data.train.y
    counted = engine.take_correct()  # None: the engine does not count right answers
    buffers = [None, None]  # gather_batches': each x is done with by the next step
    with book.training():
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            orders = [batch_order(n, config.batch_size, g, device) for g in generators]
            first_step = step
            step_losses, predictions, labels, steps = [], [], [], []
            indices = [torch.stack(step_indices) for step_indices in zip(*orders, strict=True)]
            # (members, batch, ...); x's nonzeros listed in the gather thread if they are used
            for x, y, *nonzeros in gather_batches(train_x, train_y, indices, prepare=prepare,
                                                  buffers=buffers):
                record = step in recorded
                losses, logits = engine.step(x, y, record, *nonzeros)
                if record:
                    steps.append(step)
                step_losses.append(losses)
                if counted is None:  # the engine does not count right answers: argmax here
                    predictions.append(logits.argmax(-1))
                    labels.append(y)
                step += 1
                book.tick(step)
            seconds = seconds_since(t0, device)
            frames = engine.flush(steps, epoch)
            losses = torch.stack(step_losses).cpu().numpy()  # (steps, members)
            correct = counted = engine.take_correct()
            if correct is None:
                correct = (torch.cat(predictions, 1) == torch.cat(labels, 1)).sum(1).cpu().numpy()
            sizes = np.array([len(b) for b in orders[0]], dtype=np.float64)
            if not book.epoch(epoch, first_step, step, frames, losses, correct, sizes, seconds):
                break
    return book.results(step)
