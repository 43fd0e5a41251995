"""Sweeps: run a grid of configs into one results folder, skipping finished runs, on local
processes or Ray; the per-configuration summary table; and the run listing of ``gradlab ls``.

Every run goes through ``run_one`` (or, for ``--ensemble``, ``run_ensemble`` with the other
seeds of its configuration), whichever executor calls it: it takes the run's lock
(``<out>/runs/.<run_id>.lock``, ``flock``, non-blocking), so two sweeps on the same folder never
train one run at once, and it writes through ``runner.execute`` (status.json last), so a run that
is interrupted is simply redone next time.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import store
from .config import CONFIG_FIELDS, RunConfig, make_config

EXECUTORS = ("local", "ray")
RAY_MISSING = "ray is not installed: pip install 'gradlab[ray]'"
# Outcomes of run_one besides the stored statuses (complete, diverged, failed).
LOCKED = "running elsewhere"
DONE_ELSEWHERE = "finished elsewhere"
# Statuses that a sweep does not train again: complete, and diverged (a deterministic outcome:
# the same config diverges at the same step again; delete the run folder to retrain it).
FINISHED = ("complete", "diverged")


class SweepError(RuntimeError):
    """A sweep cannot start (e.g. ray missing); the message is one line."""


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


# -- one run -----------------------------------------------------------------------------------


def lock_path(out: str | os.PathLike, run_id: str) -> Path:
    """The run's lock file: hidden and beside the run folder, so readers of ``runs/`` (pyarrow
    datasets, ``load``) never see it, and a run folder holds only its records."""
    return Path(out) / store.RUNS / f".{run_id}.lock"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, run_id: str) -> Iterator[bool]:
    """Hold the run's lock for the block; yields False (and holds nothing) if another process
    has it. The kernel drops an flock when its holder dies, even by SIGKILL."""
    fd = os.open(lock_path(out, run_id), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _clear_temp_files(path: Path) -> None:
    """Remove temporary files a killed writer left (the lock is held, so none is live)."""
    if path.is_dir():
        for tmp in path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def run_one(config: dict, out: str, data_dir: str | None, device: str, threads: int) -> dict:
    """Train one run unless it is finished or locked; the task of every executor.

    Args:
        config: ``RunConfig.to_dict()`` (plain data, so it pickles to any worker).
        out: the results folder (absolute, so remote workers write to the same place).
        data_dir: dataset root, see ``gradlab.data.resolve_data_dir``.
        device: ``auto``, ``cpu``, ``cuda``...
        threads: torch threads for this run, so parallel runs do not fight over cores.

    Returns an outcome dict: ``run_id``, ``status`` (complete, diverged, failed, or LOCKED /
    DONE_ELSEWHERE when another process has or had it), accuracy, seconds, error.
    """
    import torch

    from .runner import execute

    cfg = make_config(**config)
    run_id = cfg.run_id()
    t0 = time.perf_counter()
    with run_lock(out, run_id) as locked:
        if not locked:
            return {"run_id": run_id, "status": LOCKED}
        status = store.read_status(store.run_dir(out, run_id))
        if status is not None and status.get("status") in FINISHED:
            return {**status, "status": DONE_ELSEWHERE, "stored": status["status"]}
        _clear_temp_files(store.run_dir(out, run_id))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            status = execute(cfg, out, data_dir=data_dir, device=device)
        finally:
            torch.set_num_threads(before)
    return {**status, "seconds": time.perf_counter() - t0}


def run_ensemble(configs: list[dict], out: str, data_dir: str | None, device: str,
                 threads: int) -> list[dict]:
    """Train runs that differ only in seed as one vectorised ensemble, each run under its lock
    as in ``run_one``: runs that another process holds or has finished are left to it, the
    others are trained together. Returns one outcome dict per config, in order."""
    import torch

    from .runner import execute_ensemble

    cfgs = [make_config(**c) for c in configs]
    t0 = time.perf_counter()
    outcomes: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        todo = []
        for cfg in cfgs:
            run_id = cfg.run_id()
            if not stack.enter_context(run_lock(out, run_id)):
                outcomes[run_id] = {"run_id": run_id, "status": LOCKED}
                continue
            status = store.read_status(store.run_dir(out, run_id))
            if status is not None and status.get("status") in FINISHED:
                outcomes[run_id] = {**status, "status": DONE_ELSEWHERE,
                                    "stored": status["status"]}
                continue
            _clear_temp_files(store.run_dir(out, run_id))
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
                outcomes[status["run_id"]] = {**status, "seconds": seconds,
                                              "ensemble_size": len(todo)}
    return [outcomes[cfg.run_id()] for cfg in cfgs]


def run_task(configs: list[dict], out: str, data_dir: str | None, device: str, threads: int,
             ensemble: bool) -> list[dict]:
    """A task of every executor: one run (``run_one``) or one ensemble (``run_ensemble``);
    returns the outcome dict of each of its runs."""
    if ensemble:
        return run_ensemble(configs, out, data_dir, device, threads)
    return [run_one(configs[0], out, data_dir, device, threads)]


# -- executors: each yields lists of outcome dicts as tasks finish -------------------------------


@dataclass(frozen=True)
class Task:
    configs: tuple[RunConfig, ...]  # one run, or the runs of one ensemble
    out: str
    data_dir: str | None
    device: str
    threads: int
    ensemble: bool = False

    def args(self) -> tuple:
        return ([c.to_dict() for c in self.configs], self.out, self.data_dir, self.device,
                self.threads, self.ensemble)


def _failed(task: Task, error: BaseException) -> list[dict]:
    message = str(error).strip().splitlines()
    return [{"run_id": config.run_id(), "status": "failed",
             "error": f"{type(error).__name__}: {message[-1] if message else ''}"}
            for config in task.configs]


def run_inline(tasks: list[Task]) -> Iterator[list[dict]]:
    """One task after another in this process (``--jobs 1``): Ctrl-C stops the current one."""
    for task in tasks:
        try:
            yield run_task(*task.args())
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # e.g. the disk filled up: reported, and the sweep goes on
            yield _failed(task, e)


_in_run = False  # in a pool worker: whether run_one is running


def _on_sigterm(signum, frame) -> None:
    if _in_run:  # unwind through the writers' cleanup; the run stays unfinished
        raise KeyboardInterrupt
    os._exit(128 + signum)


def _worker_init() -> None:
    """Pool workers leave Ctrl-C to the parent and stop on SIGTERM (sent by the parent when it
    stops, or by the kernel when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    with contextlib.suppress(Exception):  # Linux only: die with the parent, even on SIGKILL
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _worker_run(*args) -> list[dict]:
    global _in_run
    _in_run = True
    try:
        return run_task(*args)
    except KeyboardInterrupt:  # stopped by the parent
        os._exit(130)
    finally:
        _in_run = False


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C while workers are spawned, so that they start with it ignored (a Ctrl-C in
    a terminal reaches the whole process group, and would break their imports)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_children() -> None:
    import multiprocessing

    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    for p in children:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


def run_pool(tasks: list[Task], jobs: int) -> Iterator[list[dict]]:
    """``jobs`` runs at once, each in its own spawned process (forking a process whose torch
    thread pools have started can deadlock)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), initializer=_worker_init,
                               mp_context=multiprocessing.get_context("spawn"))
    try:
        with _sigint_ignored():  # workers are spawned on submit
            pending = {pool.submit(_worker_run, *task.args()): task for task in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                error = future.exception()
                yield _failed(task, error) if error is not None else future.result()
    except BaseException:  # Ctrl-C, or the consumer stopped: cancel, and stop the workers
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_children()
        raise
    pool.shutdown(wait=True)


def run_ray(tasks: list[Task], jobs: int, address: str | None) -> Iterator[list[dict]]:
    """Each run as a Ray task, on the cluster at ``address`` or on a local Ray instance.

    Uses an already initialised Ray as it is (and leaves it running). Workers write to the
    shared results folder themselves, so ``out`` must be on a filesystem they all see.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # a local instance sized so that ``jobs`` runs of ``threads`` CPUs fit at once
            ray.init(num_cpus=jobs * tasks[0].threads, include_dashboard=False,
                     log_to_driver=False)
    try:
        uses_gpu = any(t.device.startswith("cuda") for t in tasks)
        # each task asks for its torch threads' worth of CPUs (a GPU task for a GPU instead, so
        # that GPUs set the pace); on a cluster, its capacity decides how many run at once
        cpus = tasks[0].threads
        remote = ray.remote(run_task).options(num_gpus=1 if uses_gpu else 0,
                                             num_cpus=0 if uses_gpu else cpus, max_retries=0)
        pending = {remote.remote(*task.args()): task for task in tasks}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except Exception as e:  # the task raised or its worker died
                    yield _failed(task, getattr(e, "cause", None) or e)
        except BaseException:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError(RAY_MISSING) from None
    return ray


# -- the sweep ---------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What a sweep did: one outcome per run of the grid, in grid order."""

    configs: list[RunConfig]
    outcomes: dict[str, dict]  # run_id -> outcome (``skipped`` for runs finished before)

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


def plan(configs: list[RunConfig], out: str | os.PathLike) -> tuple[list[RunConfig], dict]:
    """Split a grid into runs to train and outcomes of runs already finished (complete or
    diverged); unfinished and failed runs are trained (again)."""
    todo, finished = [], {}
    for config in configs:
        status = store.read_status(store.run_dir(out, config.run_id()))
        if status is not None and status.get("status") in FINISHED:
            finished[config.run_id()] = {**status, "status": "skipped",
                                         "stored": status["status"]}
        else:
            todo.append(config)
    return todo, finished


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


def seed_groups(configs: list[RunConfig]) -> list[tuple[RunConfig, ...]]:
    """The configs grouped by everything but ``seed`` (the runs of one ensemble), in order of
    each group's first config."""
    groups: dict[tuple, list[RunConfig]] = {}
    for config in configs:
        key = tuple(sorted((k, str(v)) for k, v in config.to_dict().items() if k != "seed"))
        groups.setdefault(key, []).append(config)
    return [tuple(group) for group in groups.values()]


def ensemble_tasks(configs: list[RunConfig], device: str) -> list[tuple[RunConfig, ...]]:
    """The seed groups of ``configs``, each cut into ensembles of the group size of
    ``gradlab.engines.ensemble`` for ``device`` (a few members of a small net on a CPU, all of
    them on a GPU), so that ``--jobs`` trains several ensembles at once."""
    from .engines.ensemble import group_size
    from .train import resolve_device

    tasks = []
    for group in seed_groups(configs):
        size = group_size(group[0], resolve_device(device))
        tasks += [group[i:i + size] for i in range(0, len(group), size)]
    return tasks


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
    """
    if executor not in EXECUTORS:
        raise SweepError(f"executor={executor!r} is invalid: one of {', '.join(EXECUTORS)}")
    if executor == "ray":
        import_ray()
    todo, outcomes = plan(configs, out)  # reads only
    if todo:  # nothing is written before the data are known to be there
        check_data(todo, data_dir)
    out = store.ensure_out(out).resolve()
    if on_start is not None:
        on_start(len(todo), len(outcomes))
    by_id = {c.run_id(): c for c in configs}
    groups = ensemble_tasks(todo, device) if ensemble else [(c,) for c in todo]
    tasks = [Task(group, str(out), data_dir, device, threads, ensemble)
             for group in groups]
    if not tasks:
        stream: Iterator[dict] = iter(())
    elif executor == "ray":
        stream = run_ray(tasks, jobs, ray_address)
    elif jobs > 1 and len(tasks) > 1:
        stream = run_pool(tasks, jobs)
    else:
        stream = run_inline(tasks)
    for task_outcomes in stream:
        for outcome in task_outcomes:
            if outcome["status"] == DONE_ELSEWHERE:
                outcome = {**outcome, "status": "skipped"}
            outcomes[outcome["run_id"]] = outcome
            if on_run is not None:
                on_run(by_id[outcome["run_id"]], outcome)
    for run_id, outcome in outcomes.items():  # another process may have finished it since
        if outcome["status"] == LOCKED:
            status = store.read_status(store.run_dir(out, run_id))
            if status is not None and status.get("status") in FINISHED:
                outcomes[run_id] = {**status, "status": "skipped", "stored": status["status"]}
    return SweepResult(configs, {c.run_id(): outcomes[c.run_id()] for c in configs})


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
    return "  ".join(f for f in fields if f)


# -- the summary table -------------------------------------------------------------------------


def summary_table(results: store.Results, by: list[str] | None = None) -> pd.DataFrame:
    """Final test accuracy and vanishing ratio per configuration, mean and sd over seeds.

    The per-run numbers are those of the figures and the report (``gradlab.plots``): the final
    test accuracy of complete runs, and the vanishing ratio, the median over recorded steps of
    grad_weight_norm(layer 0) / grad_weight_norm(layer depth-1), of complete and diverged runs.

    Args:
        results: ``store.load(out)``.
        by: the config columns that make a configuration; default: activation, depth, and
            any other config (seed excepted) that varies across the runs.

    Returns one row per configuration: the ``by`` columns, ``seeds`` (complete runs),
    ``diverged``, ``failed``, ``test_accuracy_mean``, ``test_accuracy_sd``,
    ``vanishing_ratio_mean``, ``vanishing_ratio_sd`` (an sd is NaN for a single seed).
    """
    from .tables import final_accuracy_table, table_keys, vanishing_ratios

    if results.runs.empty or results.epochs.empty:
        return pd.DataFrame()
    by = list(by or table_keys(results.runs))
    table = final_accuracy_table(results.epochs, results.runs, by=by).rename(
        columns={"mean": "test_accuracy_mean", "sd": "test_accuracy_sd"})
    if results.grads.empty:
        return table.assign(vanishing_ratio_mean=math.nan, vanishing_ratio_sd=math.nan)
    ratios = vanishing_ratios(results.grads).groupby(by, sort=True, dropna=False)
    ratios = ratios["vanishing_ratio"].agg(vanishing_ratio_mean="mean", vanishing_ratio_sd="std")
    return table.merge(ratios.reset_index(), on=by, how="left")


def format_summary(table: pd.DataFrame) -> str:
    """The summary table as text: ``91.30% ± 0.40`` and ``1.2e-03 ± 3e-04``."""
    if table.empty:
        return "no finished runs to summarise"

    def pm(mean: float, sd: float, fmt: Callable[[float], str]) -> str:
        if mean != mean:
            return "n/a"
        return fmt(mean) if sd != sd else f"{fmt(mean)} ± {fmt(sd)}"

    text = table.drop(columns=[c for c in table.columns if c.endswith(("_mean", "_sd"))])
    for column in ("diverged", "failed"):  # only worth a column when there are some
        if column in text and not text[column].any():
            text = text.drop(columns=column)
    text["test accuracy"] = [pm(m, s, lambda v: f"{v:.2%}") for m, s in
                             zip(table["test_accuracy_mean"], table["test_accuracy_sd"])]
    text["vanishing ratio"] = [pm(m, s, lambda v: f"{v:.3g}") for m, s in
                               zip(table["vanishing_ratio_mean"], table["vanishing_ratio_sd"])]
    return text.to_string(index=False)


def sweep_summary(out: str | os.PathLike, run_ids: Iterable[str]) -> pd.DataFrame:
    """``summary_table`` of the given runs of a results folder (other runs there are ignored)."""
    import warnings

    with warnings.catch_warnings():  # damaged runs are named by the sweep itself
        warnings.simplefilter("ignore")
        results = store.load(out)
    keep = set(run_ids)

    def subset(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["run_id"].isin(keep)] if "run_id" in frame else frame

    return summary_table(store.Results(subset(results.grads), subset(results.epochs),
                                       subset(results.runs), results.problems))


# -- listing (gradlab ls) ----------------------------------------------------------------------

LS_COLUMNS = ("run_id", "status", "engine", "depth", "widths", "activation", "init", "lr", "seed",
              "epochs", "final_test_accuracy", "note")


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    pq.ParquetFile(path).read()


def list_runs(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """The runs of a results folder (one row each, LS_COLUMNS) and one line per damaged or
    unfinished run. Raises StoreError if ``path`` is not a results folder."""
    import pyarrow as pa

    path = Path(path)
    if not path.is_dir():
        raise store.StoreError(f"{path} is not a gradlab results folder: no such folder")
    rows, problems = [], []
    for rd in store.run_dirs(path):
        name = rd.name if rd.parent.name == store.RUNS else str(rd)
        if not (rd / "config.json").exists():
            problems.append(f"{name}: no config.json (a run that never started); skipped")
            continue
        try:
            meta = store.read_run_meta(rd)
        except Exception as e:  # any damage to config.json: name it and go on
            problems.append(f"{name}: config.json unreadable ({type(e).__name__}); skipped")
            continue
        if meta["status"] == "unfinished":
            problems.append(f"{name}: no status.json (unfinished run)")
        else:
            bad = []
            for file in ("grads.parquet", "epochs.parquet"):
                try:
                    _check_parquet(rd / file)
                except (OSError, pa.ArrowException) as e:
                    bad.append(f"{file} unreadable ({type(e).__name__})")
            if bad:
                problems.append(f"{name}: {', '.join(bad)}; skipped")
                continue
        note = ""
        if meta["status"] == "diverged":
            note = f"diverged at step {meta['diverged_step']}"
        elif meta["status"] == "failed":
            note = str(meta.get("error") or "")
        row = {**{k: meta.get(k) for k in LS_COLUMNS}, "note": note}
        if meta["status"] != "complete":  # e.g. the accuracy of an epoch before it diverged
            row["final_test_accuracy"] = None
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(LS_COLUMNS))
    if not table.empty:
        table = table.sort_values(["depth", "widths", "activation", "init", "lr", "seed",
                                   "run_id"], kind="stable", ignore_index=True)
    return table, problems


def format_runs(table: pd.DataFrame) -> str:
    """The listing as aligned text, accuracy in percent."""
    text = table.copy()
    text["final_test_accuracy"] = [
        "" if v is None or v != v else f"{v:.2%}" for v in table["final_test_accuracy"]]
    text = text.rename(columns={"final_test_accuracy": "test_acc"})
    return text.to_string(index=False)

