"""What every executor runs: one run under its run lock (or, through the engines' wing, one
ensemble of seeds, each under its run lock: ``gradlab.engines.ensemble.run_ensemble``).

A run is trained unless it is finished and whole (``gradlab.validate.check_run``): a run whose
files do not read back is named, its files are moved aside (``store.set_aside``), and it is
trained again. Runs write through ``runner.execute`` (status.json last), so a run that is
interrupted is simply redone next time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from . import store
from .config import RunConfig, make_config
from .locks import LOCKED, clear_temp_files, run_lock
from .validate import check_run

# Outcome of a run that another process finished while this one waited to start it.
DONE_ELSEWHERE = "finished elsewhere"
# Statuses that a sweep does not train again: complete, and diverged (a deterministic outcome:
# the same config diverges at the same step again; delete the run folder to retrain it).
FINISHED = ("complete", "diverged")

Progress = Callable[[str, int, int], None]  # (run_id, steps done, steps in all)


def ready(out: str, run_id: str, keep: tuple[str, ...] = FINISHED
          ) -> tuple[dict | None, str | None]:
    """Ready a run's folder for training; call it holding the run's lock.

    Returns (status, damage): the stored status of a run that is whole and whose status is
    one of ``keep`` (do not train it), else None; and, for a run whose files did not read
    back, one line naming what was damaged and where its files were moved.
    """
    path = store.run_dir(out, run_id)
    status, problems = check_run(path)
    if not problems and status is not None and status["status"] in keep:
        return status, None
    damage = None
    if problems:
        aside = store.set_aside(path)
        damage = f"{'; '.join(problems)} (its files are kept in {aside.name}/)"
    clear_temp_files(path)
    return None, damage


def run_one(config: dict, out: str, data_dir: str | None, device: str, threads: int,
            on_progress: Progress | None = None, *, keep: tuple[str, ...] = FINISHED,
            progress: bool = False, on_epoch: Callable[[dict], None] | None = None,
            on_train: Callable[[str | None], None] | None = None) -> dict:
    """Train one run unless it is finished or locked; the task of every executor, and
    ``gradlab train``.

    Args:
        config: ``RunConfig.to_dict()`` (plain data, so it pickles to any worker).
        out: the results folder (absolute, so remote workers write to the same place).
        data_dir: dataset root, see ``gradlab.data.resolve_data_dir``.
        device: ``auto``, ``cpu``, ``cuda``...
        threads: torch threads for this run, so parallel runs do not fight over cores.
        on_progress: called with (run_id, steps done, steps in all) as the run trains.
        keep: the stored statuses of a whole run that are not trained again.
        progress, on_epoch: as for ``runner.execute`` (a tqdm bar; a call per epoch).
        on_train: called just before the run trains, with the ``damaged`` line or None.

    Returns an outcome dict: ``run_id``, ``status`` (complete, diverged, failed, or LOCKED /
    DONE_ELSEWHERE when another process has or had it, or it is finished with a status in
    ``keep``), accuracy, seconds (from the lock to the last file), ``train_seconds`` (the
    stored status's: training alone), error, and ``damaged`` (a line) when the run was
    trained again because its files were damaged.
    """
    import torch

    from .runner import execute

    cfg = make_config(**config)
    run_id = cfg.run_id()
    t0 = time.perf_counter()
    with run_lock(out, run_id) as locked:
        if not locked:
            return {"run_id": run_id, "status": LOCKED}
        status, damage = ready(out, run_id, keep)
        if status is not None:
            return {**status, "status": DONE_ELSEWHERE, "stored": status["status"]}
        if on_train is not None:
            on_train(damage)
        on_step = None
        if on_progress is not None:
            def on_step(done: int, total: int) -> None:
                on_progress(run_id, done, total)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            status = execute(cfg, out, data_dir=data_dir, device=device, progress=progress,
                             on_epoch=on_epoch, on_step=on_step)
        finally:
            torch.set_num_threads(before)
    return {**status, "seconds": time.perf_counter() - t0, "train_seconds": status["seconds"],
            **({"damaged": damage} if damage else {})}


@dataclass(frozen=True)
class Task:
    """One unit of work of an executor: one run, or the runs of one ensemble."""

    configs: tuple[RunConfig, ...]
    out: str
    data_dir: str | None
    device: str
    threads: int
    ensemble: bool = False

    def args(self) -> tuple:
        return ([c.to_dict() for c in self.configs], self.out, self.data_dir, self.device,
                self.threads, self.ensemble)


def run_task(configs: list[dict], out: str, data_dir: str | None, device: str, threads: int,
             ensemble: bool, on_progress: Progress | None = None) -> list[dict]:
    """A task of every executor: one run (``run_one``) or one ensemble
    (``gradlab.engines.ensemble.run_ensemble``); returns the outcome dict of each of its runs."""
    if ensemble:  # the optional engines' wing, imported only when a sweep asks for it
        from .engines.ensemble import run_ensemble

        return run_ensemble(configs, out, data_dir, device, threads)
    return [run_one(configs[0], out, data_dir, device, threads, on_progress)]


def failed(task: Task, error: BaseException) -> list[dict]:
    """The outcomes of a task that raised (e.g. its worker died): each run failed, with the
    error's last line."""
    message = str(error).strip().splitlines()
    return [{"run_id": config.run_id(), "status": "failed",
             "error": f"{type(error).__name__}: {message[-1] if message else ''}"}
            for config in task.configs]
