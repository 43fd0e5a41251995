"""``train_ensemble``: runs that differ only in their seed, trained together as one stacked model.

The members' matrix products are batched (``torch.bmm``), so the per-step cost that does not grow
with the network (Python, op dispatch, small kernels) is paid once for all of them. Each member
keeps its own initialisation and its own seeded batch order, so its records equal those of its run
trained alone with ``gradlab.train.train`` up to float rounding.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import ConfigError, RunConfig
from .data import Data
from .train import RunResult, resolve_device, train_members


def check_ensemble(configs: list[RunConfig]) -> None:
    """Raise ConfigError unless ``configs`` is non-empty and agrees on everything but ``seed``."""
    if not configs:
        raise ConfigError("configs=[] is invalid: an ensemble needs at least one run")
    first = configs[0]
    for other in configs[1:]:
        for field in dataclasses.fields(RunConfig):
            if field.name != "seed" and getattr(other, field.name) != getattr(first, field.name):
                raise ConfigError(
                    f"{field.name}={getattr(other, field.name)!r} is invalid: the runs of an "
                    f"ensemble may differ only in seed, and another run has "
                    f"{field.name}={getattr(first, field.name)!r}")


def train_ensemble(configs: list[RunConfig], *, data: Data,
                   device: str | torch.device = "auto") -> list[RunResult]:
    """Train ``configs`` (equal but for ``seed``) as one vectorised ensemble.

    Args:
        configs: the runs; one result per config, in order.
        data: the data (on ``device``), shared by all runs.
        device: ``auto``, ``cpu``, ``cuda``...

    Returns what ``train(config, data=data, device=device)`` returns for each config, except
    that each epoch's ``seconds`` is the joint epoch's wall time and ``extra`` holds
    ``ensemble_size``.
    """
    check_ensemble(configs)
    return train_members(list(configs), data, resolve_device(str(device)))
