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

``gradlab sweep --ensemble`` runs each ensemble through ``run_ensemble`` (the ``tasks.run_one`` of
an ensemble: the runs' locks, then ``execute_ensemble``, the ``runner.execute`` of an ensemble,
which writes each run's folder as if trained alone); ``ensemble_tasks`` cuts a grid into them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import traceback

import torch

from ..config import ConfigError, RunConfig, make_config
from ..data import Data, load_data
from ..locks import LOCKED, run_lock
from ..store import begin_run, ensure_out, finish_run
from ..tasks import DONE_ELSEWHERE, ready
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


# -- ensembles in a sweep ----------------------------------------------------------------------


def seed_groups(configs: list[RunConfig]) -> list[tuple[RunConfig, ...]]:
    """The configs grouped by everything but ``seed`` (the runs of one ensemble), in order of
    each group's first config."""
    groups: dict[tuple, list[RunConfig]] = {}
    for config in configs:
        key = tuple(sorted((k, str(v)) for k, v in config.to_dict().items() if k != "seed"))
        groups.setdefault(key, []).append(config)
    return [tuple(group) for group in groups.values()]


def ensemble_tasks(configs: list[RunConfig], device: str) -> list[tuple[RunConfig, ...]]:
    """The seed groups of ``configs``, each cut into ensembles of ``group_size`` for ``device``
    (a few members of a small net on a CPU, all of them on a GPU), so that ``--jobs`` trains
    several ensembles at once."""
    tasks = []
    for group in seed_groups(configs):
        size = group_size(group[0], resolve_device(device))
        tasks += [group[i:i + size] for i in range(0, len(group), size)]
    return tasks


def execute_ensemble(
    configs: list[RunConfig],
    out: str | os.PathLike,
    *,
    data_dir: str | None = None,
    device: str = "auto",
) -> list[dict]:
    """Train ``configs`` (equal but for ``seed``) as one vectorised ensemble (``train_ensemble``)
    and write each run's folder; returns their status dicts, in order. A failure during training
    is stored as ``failed`` for every run of the ensemble, as ``runner.execute`` stores it for one
    run."""
    out = ensure_out(out)
    dev = resolve_device(device)
    first = configs[0]
    data = load_data(first.dataset, data_dir, device=dev, train_size=first.train_size,
                     standardize=first.standardize)
    paths = [begin_run(out, config, str(dev), ensemble=len(configs)) for config in configs]
    try:
        results = train_ensemble(configs, data=data, device=dev)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # stored, not raised: the sweep goes on
        results = [RunResult.failed(config, str(dev), e) for config in configs]
        for path in paths:
            (path / "error.txt").write_text(traceback.format_exc())
    return [finish_run(path, result) for path, result in zip(paths, results, strict=True)]


def run_ensemble(configs: list[dict], out: str, data_dir: str | None, device: str,
                 threads: int) -> list[dict]:
    """Train runs that differ only in seed as one vectorised ensemble, each run under its lock
    as in ``tasks.run_one``: runs that another process holds or has finished are left to it,
    the others are trained together. Returns one outcome dict per config, in order."""
    cfgs = [make_config(**c) for c in configs]
    t0 = time.perf_counter()
    outcomes: dict[str, dict] = {}
    damages: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        todo = []
        for cfg in cfgs:
            run_id = cfg.run_id()
            if not stack.enter_context(run_lock(out, run_id)):
                outcomes[run_id] = {"run_id": run_id, "status": LOCKED}
                continue
            status, damage = ready(out, run_id)
            if status is not None:
                outcomes[run_id] = {**status, "status": DONE_ELSEWHERE,
                                    "stored": status["status"]}
                continue
            if damage:
                damages[run_id] = damage
            todo.append(cfg)
        if todo:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                statuses = execute_ensemble(todo, out, data_dir=data_dir, device=device)
            finally:
                torch.set_num_threads(before)
            seconds = time.perf_counter() - t0
            for status in statuses:
                run_id = status["run_id"]
                outcomes[run_id] = {**status, "seconds": seconds, "ensemble_size": len(todo),
                                    **({"damaged": damages[run_id]} if run_id in damages
                                       else {})}
    return [outcomes[cfg.run_id()] for cfg in cfgs]
