"""``train(config) -> RunResult`` and ``evaluate``: one run, in memory, no file I/O.

A training loop of another engine (``ENGINES``) builds on the public parts below, as the autograd
loop does: ``seeded_model`` for the initial weights, ``Bookkeeping`` for the progress, the epoch
ends and the results, ``evaluate`` and ``seconds_since``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .config import RunConfig
from .data import Data, Split, batch_order, load_data
from .models import build_mlp
from .record import DistributionRecorder, GradientRecorder, empty_dists, empty_frame, recorded_steps
from .store import EPOCH_COLUMNS

EVAL_BATCH = 10_000  # test rows per forward pass of an evaluation
# Engines other than this module's autograd loop, by name: "module:function", imported only
# when a run asks for one (they live in the optional gradlab.engines wing).
ENGINES = {"fused": "gradlab.engines.members:train_one"}

__all__ = ["ENGINES", "EPOCH_COLUMNS", "EVAL_BATCH", "Bookkeeping", "RunResult", "batch_loss",
           "engine", "evaluate", "make_optimizer", "resolve_device", "seconds_since",
           "seeded_model", "train", "train_autograd"]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu (as the tutorial does)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class RunResult:
    """What one run produced. ``status`` is ``complete``, ``diverged`` or ``failed``."""

    config: RunConfig
    device: str
    epochs: pd.DataFrame
    grads: pd.DataFrame
    status: str = "complete"
    diverged_step: int | None = None
    error: str | None = None
    steps: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    dists: pd.DataFrame = field(default_factory=empty_dists)  # RunConfig.dist_every's records

    @classmethod
    def failed(cls, config: RunConfig, device: str, error: BaseException) -> RunResult:
        """A result with no records for a run that failed before or outside training."""
        message = str(error).splitlines()[0] if str(error) else ""
        return cls(config, device, epochs=pd.DataFrame(columns=list(EPOCH_COLUMNS)),
                   grads=empty_frame(), status="failed",
                   error=f"{type(error).__name__}: {message}")

    @property
    def final_test_accuracy(self) -> float:
        test = self.epochs[self.epochs["split"] == "test"]
        return float(test["accuracy"].iloc[-1]) if len(test) else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH,
             forward: Callable[[int, int], torch.Tensor] | None = None) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on a split (large batches, no grad).

    ``forward(start, stop)``: the logits of those rows of the split, when an engine computes
    them its own way; by default ``model(x)``.
    """
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=split.x.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.x.device)
    for start in range(0, len(split), batch_size):
        x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
        logits = model(x) if forward is None else forward(start, start + len(y))
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(split)
    return loss.item() / n, correct.item() / n


def seeded_model(config: RunConfig, device: torch.device) -> nn.Module:
    """``config``'s network on ``device``, initialised from ``config.seed``."""
    # Seed the global RNG only inside this block, so the caller's random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_mlp(config.layer_sizes, config.activation, config.init, config.bias_init)
    return model.to(device)


def train(
    config: RunConfig,
    *,
    data: Data | None = None,
    data_dir: str | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train one configuration, recording gradients per ``config.log_every``; evaluate each epoch.

    Args:
        config: the run; ``config.engine`` says how it is trained (``autograd``: this module's
            plain PyTorch loop; others: see ``ENGINES``).
        data: preloaded data (on ``device``); loaded from ``data_dir`` when None.
        data_dir: see ``gradlab.data.resolve_data_dir``.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``...
        progress: show a tqdm bar of steps.
        on_epoch: called with each epoch's summary dict (for printing).
        on_step: called with (steps done, steps in the run) every 50 steps and at epoch ends.

    A run whose loss becomes NaN/inf stops at the end of that epoch, returns ``diverged`` with the
    first bad step, and keeps the records up to that step. Any other exception during training
    returns ``failed`` with the records made so far (KeyboardInterrupt propagates).
    """
    device = resolve_device(str(device))
    if data is None:
        data = load_data(config.dataset, data_dir, device=device, train_size=config.train_size,
                         standardize=config.standardize)
    run = train_autograd if config.engine == "autograd" else engine(config.engine)
    return run(config, data, device, progress=progress, on_epoch=on_epoch, on_step=on_step)


def engine(name: str) -> Callable[..., RunResult]:
    """The training function of engine ``name`` (see ``ENGINES``), imported on first use."""
    import importlib

    if name not in ENGINES:
        raise ValueError(f"engine={name!r} is invalid: one of autograd, {', '.join(ENGINES)}")
    module, _, function = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                foreach=True)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, foreach=True)


def batch_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss ``name`` (``RunConfig.criterion``) of a batch."""
    if name == "sigmoid_bce":  # network2.py's CrossEntropyCost: summed over outputs
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / y.shape[0]
    return F.cross_entropy(logits, y)


def train_autograd(config: RunConfig, data: Data, device: torch.device, *,
                   progress: bool = False, on_epoch: Callable[[dict], None] | None = None,
                   on_step: Callable[[int, int], None] | None = None) -> RunResult:
    """The reference engine: ``nn.Sequential``, autograd, ``torch.optim`` and the hook recorder,
    as in PyTorch's MNIST example (see ``train`` for the arguments)."""
    model = seeded_model(config, device)
    params = list(model.parameters())
    optimizer = make_optimizer(config, params)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = recorded_steps(total, config.log_every, config.log_spaced)
    generator = torch.Generator().manual_seed(config.seed)
    book = Bookkeeping([config], [model], data, on_epoch, progress, total, on_step)
    train_x, train_y = data.train.x, data.train.y
    predicted = torch.empty(n, dtype=torch.int64, device=device)
    step = 0
    dists = DistributionRecorder(model, recorded_steps(total, config.dist_every,
                                                       config.dist_log_spaced))
    dist_frames = []
    with book.training(), dists, GradientRecorder(model, config.activation, schedule,
                                                  optimizer=optimizer,
                                                  applied_updates=config.applied_updates
                                                  ) as recorder:
        model.train()
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            batches = batch_order(n, config.batch_size, generator, device)
            first_step = step
            step_losses = []
            start = 0
            for batch in batches:
                x, y = train_x[batch], train_y[batch]
                recording = recorder.begin_step(step)
                dists.begin_step(step)
                logits = model(x)
                loss = batch_loss(config.criterion, logits, y)
                for p in params:  # zero_grad(set_to_none=True), without its per-call wrapper
                    p.grad = None
                loss.backward()
                if recording:
                    recorder.after_backward(loss)
                dists.after_backward()
                if config.clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(params, config.clip_grad_norm, foreach=True)
                optimizer.step()
                if recording:
                    recorder.after_update()
                # per-step results stay on the device; reduced once per epoch
                step_losses.append(loss.detach())
                stop = start + y.shape[0]
                torch.argmax(logits, 1, out=predicted[start:stop])
                start = stop
                step += 1
                book.tick(step)
            seconds = seconds_since(t0, device)
            losses = torch.stack(step_losses).cpu().numpy()[:, None]
            correct = (predicted == train_y[torch.cat(batches)]).sum().cpu().numpy()[None]
            sizes = np.array([len(b) for b in batches], dtype=np.float64)
            dist_frames.append(dists.flush(epoch))
            if not book.epoch(epoch, first_step, step, [recorder.flush(epoch)], losses,
                              correct, sizes, seconds):
                break
    result = book.results(step)[0]
    if dist_frames:
        frame = pd.concat(dist_frames, ignore_index=True)
        if result.diverged_step is not None:  # kept up to the first bad step, as the norms
            frame = frame[frame["step"] <= result.diverged_step].reset_index(drop=True)
        result.dists = frame
    return result


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)


def seconds_since(t0: float, device: torch.device) -> float:
    """Wall seconds since ``t0`` once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


class Bookkeeping:
    """What every training loop shares (this module's, and each engine's): the progress bar,
    epoch ends (divergence, evaluation, rows), and turning a training error into ``failed``
    results, for one run or for members trained together.

    Args:
        configs, models: the members' configs (equal but for ``seed``) and networks.
        data: the data they train on.
        on_epoch, progress, total, on_step: as ``train``'s; ``total`` is the steps of a run.
        evaluators: per member, its (test loss, accuracy) now; by default ``evaluate`` of the
            member's model on ``data.test``.
    """

    def __init__(self, configs, models, data, on_epoch, progress: bool = False, total: int = 0,
                 on_step: Callable[[int, int], None] | None = None,
                 evaluators: list[Callable[[], tuple[float, float]]] | None = None):
        self.configs, self.models, self.data, self.on_epoch = configs, models, data, on_epoch
        self.on_step, self.total = on_step, total
        # per member: its test loss and accuracy now (an engine may compute them its own way)
        self.evaluators = evaluators or [
            lambda model=model: evaluate(model, data.test) for model in models]
        self.rows: list[list[dict]] = [[] for _ in configs]
        self.frames: list[list[pd.DataFrame]] = [[] for _ in configs]
        self.out = [RunResult(c, "", epochs=pd.DataFrame(columns=list(EPOCH_COLUMNS)),
                              grads=empty_frame()) for c in configs]
        self.running = list(range(len(configs)))  # members neither diverged nor failed
        self.t_run = time.perf_counter()
        self.bar = _progress_bar(progress, total)

    @contextlib.contextmanager
    def training(self):
        """Around the epoch loop: an error while training fails the running members (their
        records so far are kept); KeyboardInterrupt propagates; the bar is closed either way."""
        try:
            yield
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
            self.fail(e)
        finally:
            if self.bar is not None:
                self.bar.close()

    def tick(self, step: int) -> None:
        """After each step: the bar and ``on_step`` move on every 50 steps."""
        if step % 50 == 0:
            if self.bar is not None:
                self.bar.update(50)
            if self.on_step is not None:
                self.on_step(step, self.total)

    def epoch(self, epoch, first_step, step, frames, losses, correct, sizes, seconds) -> bool:
        """Close an epoch: ``losses`` is (steps, members), ``correct`` per member; returns
        whether any member goes on training."""
        n = len(self.data.train)
        config = self.configs[0]
        for m in list(self.running):
            bad = np.flatnonzero(~np.isfinite(losses[:, m]))
            if len(bad):
                first = first_step + int(bad[0])
                self.frames[m].append(frames[m][frames[m]["step"] <= first])
                self.out[m].status, self.out[m].diverged_step = "diverged", first
                self.out[m].steps = step
                self.running.remove(m)
                continue
            self.frames[m].append(frames[m])
            train_loss = float((losses[:, m].astype(np.float64) * sizes).sum() / n)
            train_acc = int(correct[m]) / n
            t1 = time.perf_counter()
            test_loss, test_acc = self.evaluators[m]()
            eval_seconds = time.perf_counter() - t1
            self.rows[m] += [
                dict(epoch=epoch, split="train", step=step, loss=train_loss,
                     accuracy=train_acc, seconds=seconds),
                dict(epoch=epoch, split="test", step=step, loss=test_loss,
                     accuracy=test_acc, seconds=eval_seconds),
            ]
            if self.on_epoch is not None:
                self.on_epoch({"epoch": epoch, "epochs": config.epochs,
                               "train_loss": train_loss, "train_accuracy": train_acc,
                               "test_loss": test_loss, "test_accuracy": test_acc,
                               "seconds": seconds})
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if self.on_step is not None:
            self.on_step(step, self.total)
        return bool(self.running)

    def fail(self, e: BaseException) -> None:
        """Mark the running members failed with ``e``'s first line."""
        for m in self.running:
            self.out[m].status = "failed"
            self.out[m].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def results(self, step: int) -> list[RunResult]:
        """Each member's ``RunResult`` once training ends at ``step``, in order."""
        for m, result in enumerate(self.out):
            result.device = str(self.data.train.x.device)
            if result.status != "diverged":
                result.steps = step
            result.seconds = time.perf_counter() - self.t_run
            result.epochs = pd.DataFrame(self.rows[m], columns=list(EPOCH_COLUMNS))
            if self.frames[m]:
                result.grads = pd.concat(self.frames[m], ignore_index=True)
        return self.out
