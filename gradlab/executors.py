"""Executors of a sweep's tasks: inline, a local process pool, or Ray. Each yields lists of
outcome dicts as tasks finish, and stops its workers when it is stopped (Ctrl-C, SIGTERM, or
the consumer leaving); ``on_progress(run_id, steps_done, steps_total)`` is called in this
process as runs train (from pool workers through a queue; from Ray once per finished run).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Iterator

from .errors import GradlabError
from .startup import Terminated
from .tasks import Progress, Task, failed, run_task

EXECUTORS = ("local", "ray")
RAY_MISSING = "ray is not installed: pip install 'gradlab[ray]'"
RAY_CONNECT_SECONDS = 10  # how long to wait for a Ray cluster to answer


class SweepError(GradlabError, RuntimeError):
    """A sweep cannot start (e.g. ray missing); the message is one line."""


def run_inline(tasks: list[Task], on_progress: Progress | None = None) -> Iterator[list[dict]]:
    """One task after another in this process (``--jobs 1``): Ctrl-C stops the current one."""
    for task in tasks:
        try:
            yield run_task(*task.args(), on_progress)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # e.g. the disk filled up: reported, and the sweep goes on
            yield failed(task, e)


# -- a pool of local processes -------------------------------------------------------------------

_in_run = False  # in a pool worker: whether a task is running
_progress_queue = None  # in a pool worker: where progress goes to the parent


def _on_sigterm(signum, frame) -> None:
    if _in_run:  # unwind through the writers' cleanup; the run stays unfinished
        raise KeyboardInterrupt
    os._exit(128 + signum)


def _quiet_interrupt(unraisable) -> None:
    """A SIGTERM that lands in a C callback (numba compiling a kernel) cannot unwind: Python
    would print it as an ignored exception with a traceback and go on. Stop the worker there,
    quietly; its run stays unfinished, as after any stop (its files are written atomically)."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        os._exit(128 + signal.SIGTERM)
    sys.__unraisablehook__(unraisable)


def _worker_init(progress_queue) -> None:
    """Pool workers leave Ctrl-C to the parent and stop on SIGTERM (sent by the parent when it
    stops, or by the kernel when it dies)."""
    global _progress_queue
    _progress_queue = progress_queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.unraisablehook = _quiet_interrupt
    with contextlib.suppress(Exception):  # Linux only: die with the parent, even on SIGKILL
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _put_progress(run_id: str, done: int, total: int) -> None:
    with contextlib.suppress(Exception):  # progress is never worth failing a run for
        _progress_queue.put_nowait((run_id, done, total))


def _worker_run(*args) -> list[dict]:
    global _in_run
    _in_run = True
    try:
        return run_task(*args, _put_progress if _progress_queue is not None else None)
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


def _drain(progress_queue, on_progress: Progress | None) -> None:
    while True:
        try:
            item = progress_queue.get_nowait()
        except (queue.Empty, OSError, ValueError, EOFError):
            return
        if on_progress is not None:
            on_progress(*item)


def run_pool(tasks: list[Task], jobs: int,
             on_progress: Progress | None = None) -> Iterator[list[dict]]:
    """``jobs`` runs at once, each in its own spawned process (forking a process whose torch
    thread pools have started can deadlock)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue() if on_progress is not None else None
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), initializer=_worker_init,
                               initargs=(progress_queue,), mp_context=context)
    try:
        with _sigint_ignored():  # workers are spawned on submit
            pending = {pool.submit(_worker_run, *task.args()): task for task in tasks}
        while pending:
            done, _ = wait(pending, timeout=0.25 if progress_queue else None,
                           return_when=FIRST_COMPLETED)
            if progress_queue is not None:
                _drain(progress_queue, on_progress)
            for future in done:
                task = pending.pop(future)
                error = future.exception()
                yield failed(task, error) if error is not None else future.result()
    except BaseException:  # Ctrl-C, or the consumer stopped: cancel, and stop the workers
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_children()
        raise
    finally:
        if progress_queue is not None:
            progress_queue.close()
            progress_queue.join_thread()
    pool.shutdown(wait=True)


# -- Ray -----------------------------------------------------------------------------------------


def import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError(RAY_MISSING) from None
    return ray


def check_ray_address(address: str) -> None:
    """Make sure something answers at a Ray cluster's ``host:port`` within a few seconds:
    ``ray.init`` retries a dead address for minutes, deaf to Ctrl-C."""
    if address == "auto" or address.startswith("local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--ray-address {address!r} is invalid: give HOST:PORT of a running "
                         f"Ray cluster, or leave it out to start a local one")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_SECONDS).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise SweepError(f"cannot reach a Ray cluster at {address}: {reason}: start one "
                         f"(ray start --head) or leave out --ray-address") from None


def start_ray(ray, address: str | None, cpus: int) -> None:
    """Connect to the cluster at ``address``, or start a local instance of ``cpus`` CPUs.

    ``ray.init`` sets its own SIGTERM handler (``sys.exit(15)``); the command's own is put
    back, and a SIGTERM during ``ray.init`` is raised as ``Terminated``, so that SIGTERM stops
    a Ray sweep as Ctrl-C does."""
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            check_ray_address(address)
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    except SystemExit as e:
        if e.code == signal.SIGTERM:  # Ray's handler
            raise Terminated() from None
        raise
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        if isinstance(e, SweepError):
            raise
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SweepError(f"cannot start Ray{f' at {address}' if address else ''}: "
                         f"{line}") from None
    finally:
        if main and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def run_ray(tasks: list[Task], jobs: int, address: str | None,
            on_progress: Progress | None = None,
            env: dict[str, str] | None = None) -> Iterator[list[dict]]:
    """Each run as a Ray task, on the cluster at ``address`` or on a local Ray instance; ``env``:
    environment variables its workers start with (the portable mode's settings).

    Uses an already initialised Ray as it is (and leaves it running). Workers write to the
    shared results folder themselves, so ``out`` must be on a filesystem they all see.
    Progress is reported once per finished run.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    try:
        if started:
            # a local instance sized so that ``jobs`` runs of ``threads`` CPUs fit at once
            start_ray(ray, address, jobs * tasks[0].threads)
        uses_gpu = any(t.device.startswith("cuda") for t in tasks)
        # each task asks for its torch threads' worth of CPUs (a GPU task for a GPU instead, so
        # that GPUs set the pace); on a cluster, its capacity decides how many run at once
        cpus = tasks[0].threads
        remote = ray.remote(run_task).options(num_gpus=1 if uses_gpu else 0,
                                             num_cpus=0 if uses_gpu else cpus, max_retries=0,
                                             **({"runtime_env": {"env_vars": env}} if env
                                                else {}))
        pending = {remote.remote(*task.args()): task for task in tasks}
        try:
            while pending:
                # a timeout, so that Ctrl-C and SIGTERM are seen between waits
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                if not done:
                    continue
                task = pending.pop(done[0])
                try:
                    outcomes = ray.get(done[0])
                except Exception as e:  # the task raised or its worker died
                    outcomes = failed(task, getattr(e, "cause", None) or e)
                if on_progress is not None:
                    for outcome in outcomes:
                        steps = outcome.get("steps") or 0
                        on_progress(outcome["run_id"], steps, steps)
                yield outcomes
        except BaseException:
            # a local instance of our own ends every task at its shutdown (below); cancelling
            # there too races with tasks that are just finishing, which crashes Ray's core
            # worker ("Tried to complete task that was not pending"). On a cluster, or a Ray
            # the caller started, the tasks would outlive us: cancel them.
            if not (started and address is None):
                for ref in pending:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            with contextlib.suppress(Exception):
                ray.shutdown()
