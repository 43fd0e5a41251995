"""Sweeps: run a grid of configs into one results folder, skipping finished runs, on local
processes or Ray (``gradlab.executors``).

Every run goes through ``tasks.run_one`` (or, for ``--ensemble``,
``gradlab.engines.ensemble.run_ensemble`` with the other seeds of its configuration), whichever
executor calls it: it takes the run's lock (``gradlab.locks``), so two processes on the same
folder never train one run at once; it trains again a run whose files do not read back
(``gradlab.validate``), its damaged files moved aside; and it writes through ``runner.execute``
(status.json last), so a run that is interrupted is simply redone next time.

The summary table lives in ``gradlab.summary`` and the listing of ``gradlab ls`` in
``gradlab.listing``; their names are importable from here too.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import store
from .config import CONFIG_FIELDS, RunConfig
from .executors import (
    EXECUTORS,
    RAY_MISSING,
    SweepError,
    check_ray_address,
    import_ray,
    run_inline,
    run_pool,
    run_ray,
)
from .listing import LS_COLUMNS, format_runs, list_runs
from .locks import LOCKED, lock_path, run_lock
from .summary import format_summary, summary_table, sweep_summary
from .tasks import DONE_ELSEWHERE, FINISHED, Progress, Task, run_one, run_task
from .validate import check_run

# Names other modules import from here (the sweep's public face); they live in its parts.
__all__ = ["DONE_ELSEWHERE", "EXECUTORS", "FINISHED", "LOCKED", "LS_COLUMNS", "RAY_MISSING",
           "SweepError", "SweepResult", "Task", "check_data", "cores", "format_runs",
           "format_summary", "import_ray", "label", "list_runs", "lock_path", "outcome_line",
           "plan", "run_lock", "run_one", "run_sweep", "run_task", "summary_table",
           "sweep_summary"]


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Every sweep run uses this many torch threads unless told otherwise, whatever ``jobs`` is: float32
# matmuls can round differently at different thread counts, and a run's records must not depend on
# how many other runs trained beside it (nor on the machine's core count, for `gradlab figures`).
THREADS = 1


# -- the sweep ---------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What a sweep did: one outcome per run of the grid, in grid order."""

    configs: list[RunConfig]
    outcomes: dict[str, dict]  # run_id -> outcome (``skipped`` for runs finished before)
    # the plan's verdict on each run (``gradlab.reader.Folder``): the summary reads the runs
    # that were finished then from it, not again (``summary.sweep_results``)
    folder: object = None

    def status(self, run_id: str) -> str:
        """The run's status now: a skipped run's is the stored one."""
        o = self.outcomes[run_id]
        return o.get("stored", o["status"])

    @property
    def ok(self) -> bool:
        """Whether every run of the grid is complete."""
        return all(self.status(c.run_id()) == "complete" for c in self.configs)

    def problems(self) -> list[str]:
        """One line per run that is not complete."""
        lines = []
        for config in self.configs:
            o = self.outcomes[config.run_id()]
            status = self.status(config.run_id())
            if status == "complete":
                continue
            what = {"diverged": f"diverged at step {o.get('diverged_step')}",
                    "failed": f"failed: {o.get('error')}",
                    LOCKED: "running elsewhere (another process holds its lock); run the "
                            "sweep again when it is done"}.get(status, status)
            lines.append(f"{config.run_id()} ({label(config, self.configs)}): {what}")
        return lines

    def repaired(self) -> list[str]:
        """One line per run that was trained again because its files were damaged."""
        return [f"{c.run_id()} ({label(c, self.configs)}): was damaged: "
                f"{self.outcomes[c.run_id()]['damaged']}; trained again"
                for c in self.configs if self.outcomes[c.run_id()].get("damaged")]


def plan(configs: list[RunConfig], out: str | os.PathLike) -> tuple[list[RunConfig], dict]:
    """Split a grid into runs to train and outcomes of runs already finished (complete or
    diverged, with every file they promise readable: ``gradlab.reader``); unfinished, failed
    and damaged runs are trained (again). Reads only."""
    return plan_folder(configs, out)[:2]


def plan_folder(configs: list[RunConfig], out: str | os.PathLike):
    """``plan``, and the verdict on each run of the grid that ``out`` holds (a
    ``gradlab.reader.Folder``; None where ``out`` holds no runs): every run read once, in
    threads (1,000 runs: 1.17 s, from 1.64 s run by run with check_run)."""
    from .reader import read_folder

    folder = None
    with contextlib.suppress(OSError, store.StoreError):  # (no runs yet: all to train)
        if (Path(out) / store.RUNS).is_dir():
            folder = read_folder(out, [c.run_id() for c in configs])
    verdicts = {r.run_id: r for r in folder.runs} if folder is not None else {}
    todo, finished = [], {}
    for config in configs:
        run = verdicts.get(config.run_id())
        status = run.status if run is not None and run.state in FINISHED else None
        if status is not None:
            finished[config.run_id()] = {**status, "status": "skipped",
                                         "stored": status["status"]}
        else:
            todo.append(config)
    return todo, finished, folder


def finished_status(out: str | os.PathLike, run_id: str) -> dict | None:
    """The status of a run that is finished and whole, else None."""
    status, problems = check_run(store.run_dir(out, run_id))
    if problems or status is None or status["status"] not in FINISHED:
        return None
    return status


def check_data(configs: Iterable[RunConfig], data_dir: str | None) -> None:
    """Make sure every dataset of the grid is there, whole and large enough for every
    ``train_size``, before any run starts (raises DataError)."""
    from .data import ensure_data, resolve_data_dir

    largest: dict[str, int | None] = {}  # the largest train_size per dataset (None: all)
    for c in configs:
        sizes = [v for v in (largest.get(c.dataset), c.train_size) if v is not None]
        largest[c.dataset] = max(sizes, default=None)
    for dataset in sorted(largest):
        ensure_data(dataset, resolve_data_dir(data_dir), largest[dataset])


def run_sweep(
    configs: list[RunConfig],
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    on_start: Callable[[int, int], None] | None = None,
    on_run: Callable[[RunConfig, dict], None] | None = None,
    threads: int = THREADS,
    ensemble: bool = False,
    on_progress: Progress | None = None,
    portable: bool = False,
) -> SweepResult:
    """Run every config of a grid into ``out``; finished runs are skipped.

    Args:
        configs: the grid (``expand_grid``).
        out: results folder; created if needed.
        jobs: runs at once, as local processes or Ray tasks.
        executor: ``local`` or ``ray``.
        ray_address: an existing Ray cluster; a local Ray instance when None.
        data_dir, device: passed to each run.
        on_start: called with (runs to train, runs skipped) before the first run.
        on_run: called with each run's config and outcome as it finishes.
        threads: torch threads (and Ray CPUs) per run; fixed, so that records do not depend
            on ``jobs``.
        ensemble: train the runs that differ only in seed together, as one vectorised
            ensemble per configuration (``gradlab.engines.ensemble``; the configs' engine must
            be ``fused``).
        on_progress: called in this process with (run_id, steps done, steps in all) as runs
            train (Ray and ensembles: once per finished run).
        portable: train in the portable CPU mode (``gradlab.portable``): pool workers inherit
            its settings, Ray tasks get them in their ``runtime_env``; where this process
            loaded torch before the settings were made, even one run trains in a fresh worker.
    """
    if executor not in EXECUTORS:
        raise SweepError(f"executor={executor!r} is invalid: one of {', '.join(EXECUTORS)}")
    if not portable:
        return _run_sweep(configs, out, jobs, executor, ray_address, data_dir, device, on_start,
                          on_run, threads, ensemble, on_progress)
    from . import portable as mode

    in_effect, previous = mode.enter()
    try:  # where it is not in effect here, even one run trains in a fresh worker
        return _run_sweep(configs, out, jobs, executor, ray_address, data_dir, device, on_start,
                          on_run, threads, ensemble, on_progress,
                          env=dict(mode.SETTINGS), fresh_workers=not in_effect)
    finally:
        mode.leave(previous)


def _run_sweep(configs, out, jobs, executor, ray_address, data_dir, device, on_start, on_run,
               threads, ensemble, on_progress, env: dict | None = None,
               fresh_workers: bool = False) -> SweepResult:
    """``run_sweep``; ``env``: the environment of Ray's tasks; ``fresh_workers``: train every
    run in a pool worker, even with ``jobs`` 1."""
    if executor == "ray":
        import_ray()
        if ray_address:  # before any line is printed: a dead address is one line
            check_ray_address(ray_address)
    todo, outcomes, folder = plan_folder(configs, out)  # reads only
    if todo:  # nothing is written before the data are known to be there
        check_data(todo, data_dir)
    out = store.ensure_out(out).resolve()
    if on_start is not None:
        on_start(len(todo), len(outcomes))
    by_id = {c.run_id(): c for c in configs}
    if ensemble:  # the optional engines' wing, imported only when asked for
        from .engines.ensemble import ensemble_tasks

        groups = ensemble_tasks(todo, device)
    else:
        groups = [(c,) for c in todo]
    tasks = [Task(group, str(out), data_dir, device, threads, ensemble)
             for group in groups]
    if not tasks:
        stream: Iterator[dict] = iter(())
    elif executor == "ray":
        stream = run_ray(tasks, jobs, ray_address, on_progress, env=env)
    elif fresh_workers or (jobs > 1 and len(tasks) > 1):
        stream = run_pool(tasks, jobs, on_progress)
    else:
        stream = run_inline(tasks, on_progress)
    for task_outcomes in stream:
        for outcome in task_outcomes:
            if outcome["status"] == DONE_ELSEWHERE:
                outcome = {**outcome, "status": "skipped"}
            outcomes[outcome["run_id"]] = outcome
            if on_run is not None:
                on_run(by_id[outcome["run_id"]], outcome)
    for run_id, outcome in outcomes.items():  # another process may have finished it since
        if outcome["status"] == LOCKED:
            status = finished_status(out, run_id)
            if status is not None:
                outcomes[run_id] = {**status, "status": "skipped", "stored": status["status"]}
    return SweepResult(configs, {c.run_id(): outcomes[c.run_id()] for c in configs}, folder)


def label(config: RunConfig, configs: list[RunConfig]) -> str:
    """The config values that vary across the sweep, e.g. ``depth=5 activation=relu seed=0``."""
    varying = [k for k in CONFIG_FIELDS if len({getattr(c, k) for c in configs}) > 1]
    parts = []
    for key in varying or ["depth", "activation"]:
        value = getattr(config, key)
        parts.append(f"{key}={','.join(map(str, value)) if key == 'widths' else value}")
    return " ".join(parts)


def outcome_line(config: RunConfig, outcome: dict, configs: list[RunConfig]) -> str:
    """One line for a finished run: status, accuracy, seconds."""
    status = outcome["status"]
    acc = outcome.get("final_test_accuracy")
    acc_text = "" if acc is None or (isinstance(acc, float) and math.isnan(acc)) else f"{acc:.2%}"
    extra = {"diverged": f"at step {outcome.get('diverged_step')}",
             "failed": str(outcome.get("error"))}.get(status, "")
    seconds = outcome.get("seconds")
    time_text = f"{seconds:.1f}s" if seconds is not None else ""
    fields = [f"{status:<9}", config.run_id(), label(config, configs), acc_text, time_text, extra]
    if outcome.get("damaged"):
        fields.append(f"(trained again: {outcome['damaged']})")
    return "  ".join(f for f in fields if f)
