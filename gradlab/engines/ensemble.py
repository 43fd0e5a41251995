"""``train_ensemble``: runs that differ only in their seed, trained together as stacked models.

The members' matrix products are batched (``torch.bmm``), so the per-step cost that does not grow
with the network (Python, op dispatch, small kernels) is paid once for all of them. Each member
keeps its own initialisation and its own seeded batch order, so its records equal those of its run
trained alone with ``gradlab.train.train`` up to float rounding.

On a CPU the products of a small net already run near the matmul peak, and stacking many members
pushes their weights and gradients out of the core's caches (the tutorial's net holds 1.1 MB of
them a member; group sizes measured in ``benchmarks/RESULTS.md``). So on a CPU the runs are
trained in groups whose weights and gradients fit ``CPU_GROUP_BYTES`` (a part of the last-level
cache), one group after another; on a GPU, all together.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConfigError, RunConfig
from ..data import Data
from ..train import RunResult, resolve_device
from .members import train_members

CPU_GROUP_BYTES = 8 << 20


def group_size(config: RunConfig, device: torch.device) -> int:
    """How many members to stack at once (see the module docstring)."""
    if device.type != "cpu":
        return 1 << 30
    sizes = config.layer_sizes
    parameters = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    return max(1, CPU_GROUP_BYTES // (2 * 4 * parameters))  # float32 weights and gradients


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
    that each epoch's ``seconds`` is the wall time of the epoch of the member's group, whose
    size ``extra["ensemble_size"]`` holds.
    """
    check_ensemble(configs)
    device = resolve_device(str(device))
    size = group_size(configs[0], device)
    results = []
    for start in range(0, len(configs), size):
        group = list(configs[start:start + size])
        for result in train_members(group, data, device):
            result.extra["ensemble_size"] = len(group)
            results.append(result)
    return results
