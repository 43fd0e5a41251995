"""``train(config) -> RunResult`` and ``evaluate``: one run, in memory, no file I/O."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import RunConfig
from .data import Data, Split, batch_order, load_data
from .models import build_mlp
from .record import GradientRecorder, empty_frame, recorded_steps

EVAL_BATCH = 10_000
EPOCH_COLUMNS = ("epoch", "split", "step", "loss", "accuracy", "seconds")


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


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                foreach=True)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, foreach=True)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on a split (large batches, no grad)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=split.x.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.x.device)
    for start in range(0, len(split), batch_size):
        x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(split)
    return loss.item() / n, correct.item() / n


def _seeded_model(config: RunConfig, device: torch.device) -> nn.Module:
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
) -> RunResult:
    """Train one configuration, recording gradients per ``config.log_every``; evaluate each epoch.

    Args:
        config: the run.
        data: preloaded data (on ``device``); loaded from ``data_dir`` when None.
        data_dir: see ``gradlab.data.resolve_data_dir``.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``...
        progress: show a tqdm bar of steps.
        on_epoch: called with each epoch's summary dict (for printing).

    A run whose loss becomes NaN/inf stops at the end of that epoch, returns ``diverged`` with the
    first bad step, and keeps the records up to that step. Any other exception during training
    returns ``failed`` with the records made so far (KeyboardInterrupt propagates).
    """
    device = resolve_device(str(device))
    if data is None:
        data = load_data(config.dataset, data_dir, device=device, train_size=config.train_size,
                         standardize=config.standardize)
    model = _seeded_model(config, device)
    optimizer = make_optimizer(config, model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    n = len(data.train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = recorded_steps(total, config.log_every, config.log_spaced)
    generator = torch.Generator().manual_seed(config.seed)
    result = RunResult(config, str(device), epochs=pd.DataFrame(columns=list(EPOCH_COLUMNS)),
                       grads=empty_frame())
    epoch_rows: list[dict] = []
    grad_frames: list[pd.DataFrame] = []
    step_loss = torch.zeros(steps_per_epoch, device=device)
    step_correct = torch.zeros(steps_per_epoch, dtype=torch.int64, device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)
    step = 0
    t_run = time.perf_counter()
    try:
        with GradientRecorder(model, config.activation, schedule) as recorder:
            model.train()
            for epoch in range(1, config.epochs + 1):
                t0 = time.perf_counter()
                batches = batch_order(n, config.batch_size, generator, device)
                for i, index in enumerate(batches):
                    x, y = data.train.x[index], data.train.y[index]
                    recording = recorder.begin_step(step)
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if recording:
                        recorder.after_backward(loss)
                    if config.clip_grad_norm is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm,
                                                 foreach=True)
                    optimizer.step()
                    if recording:
                        recorder.after_update()
                    step_loss[i] = loss.detach()
                    torch.sum(logits.detach().argmax(1) == y, dim=0, out=step_correct[i])
                    step += 1
                    if bar is not None and i % 50 == 49:
                        bar.update(50)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                grads = recorder.flush(epoch)
                losses = step_loss[: len(batches)].cpu().numpy()
                bad = np.flatnonzero(~np.isfinite(losses))
                if len(bad):
                    first = (step - len(batches)) + int(bad[0])
                    grad_frames.append(grads[grads["step"] <= first])
                    result.status, result.diverged_step = "diverged", first
                    break
                grad_frames.append(grads)
                sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
                train_loss = float((torch.from_numpy(losses).double() * sizes).sum() / n)
                train_acc = step_correct[: len(batches)].sum().item() / n
                t1 = time.perf_counter()
                test_loss, test_acc = evaluate(model, data.test)
                eval_seconds = time.perf_counter() - t1
                rows = [
                    dict(epoch=epoch, split="train", step=step, loss=train_loss,
                         accuracy=train_acc, seconds=seconds),
                    dict(epoch=epoch, split="test", step=step, loss=test_loss,
                         accuracy=test_acc, seconds=eval_seconds),
                ]
                epoch_rows += rows
                if bar is not None:
                    bar.update(step - bar.n)
                if on_epoch is not None:
                    on_epoch({"epoch": epoch, "epochs": config.epochs, "train_loss": train_loss,
                              "train_accuracy": train_acc, "test_loss": test_loss,
                              "test_accuracy": test_acc, "seconds": seconds})
    except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
        result.status = "failed"
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if bar is not None:
            bar.close()
    result.steps = step
    result.seconds = time.perf_counter() - t_run
    result.epochs = pd.DataFrame(epoch_rows, columns=list(EPOCH_COLUMNS))
    if grad_frames:
        result.grads = pd.concat(grad_frames, ignore_index=True)
    return result
