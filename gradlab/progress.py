"""Progress on the terminal: a sweep's steps across its runs with an ETA, and the lines that
``gradlab train`` prints for one run.

Imports only click at module level (tqdm and the sweep when first used), so that the command
line's ``--help`` stays instant.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click

# The ETA is the steps left at the step rate measured since the first steps were reported, once
# that is this many seconds old; before (process start-up, data loading, a first slow batch
# would make it wild: 46:00 for a 51 s job) it says "estimating".
WARM_SECONDS = 5.0
ESTIMATING = "estimating time left"


def planned_steps(config) -> int:
    """The optimizer steps a run takes, from its config alone (before its data is loaded)."""
    from .data import TRAIN_SIZES

    examples = config.train_size if config.train_size is not None else TRAIN_SIZES[config.dataset]
    return config.epochs * -(-examples // config.batch_size)


class SweepProgress:
    """Progress of a sweep on stderr (for sweep and figures), counted in training steps across
    every run to train, with an ETA, and one line per finished run: a tqdm bar on a terminal,
    else plain lines at most every ``every`` seconds (a log file gets no redraws).

    Its methods are ``run_sweep``'s callbacks: ``on_start``, ``on_run`` and ``on_progress``
    (``fn(run_id, steps_done, steps_total)``). Without ``on_progress`` a run's steps count
    when it finishes. ``clock`` (seconds, monotonic) is for tests.
    """

    def __init__(self, configs, out, *, stream=None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.configs, self.out = configs, out
        self.clock = clock
        self.flow: tuple[float, int] | None = None  # (time, steps) when steps were first seen
        self.stream = stream or sys.stderr
        self.every = every
        self.totals = {c.run_id(): planned_steps(c) for c in configs}
        self.done: dict[str, int] = {}
        self.todo: set[str] = set()
        self.runs_done = 0
        self.bar = None
        self.started = self.shown = 0.0

    @property
    def steps(self) -> tuple[int, int]:
        """(steps done, steps in all) of the runs to train."""
        return (sum(self.done.get(r, 0) for r in self.todo),
                sum(self.totals[r] for r in self.todo))

    def on_start(self, todo: int, skipped: int) -> None:
        from .sweep import plan

        click.echo(f"{len(self.configs)} runs into {self.out}: {skipped} already finished, "
                   f"{todo} to train", file=self.stream)
        self.todo = {c.run_id() for c in plan(self.configs, self.out)[0]} if todo else set()
        self.started = self.shown = self.clock()
        if todo and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps[1], unit="step", unit_scale=True,
                            file=self.stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps "
                                       "[{elapsed}{postfix}]",
                            postfix=f"{self.runs_text()}, {ESTIMATING}")

    def on_progress(self, run_id: str, steps_done: int, steps_total: int) -> None:
        self.totals[run_id] = steps_total  # the run's own count is the truth
        self.done[run_id] = steps_done
        self.todo.add(run_id)
        self.show()

    def on_run(self, config, outcome: dict) -> None:
        from .sweep import outcome_line

        run_id = config.run_id()
        self.done[run_id] = self.totals[run_id]  # a diverged run ends early: nothing left
        self.todo.add(run_id)
        self.runs_done += 1
        line = outcome_line(config, outcome, self.configs)
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            click.echo(line, file=self.stream)
        self.show(force=True)

    def runs_text(self) -> str:
        return f"{self.runs_done}/{len(self.todo)} runs"

    def time_left(self, done: int, total: int, now: float) -> str:
        """The time left at the step rate since the first steps were seen, or "estimating"
        until that rate is ``WARM_SECONDS`` old."""
        from tqdm import tqdm

        if done >= total:
            return "done"
        if self.flow is None or now - self.flow[0] < WARM_SECONDS or done <= self.flow[1]:
            return ESTIMATING
        rate = (done - self.flow[1]) / (now - self.flow[0])
        return f"{tqdm.format_interval((total - done) / rate)} left"

    def show(self, force: bool = False) -> None:
        done, total = self.steps
        now = self.clock()
        if self.flow is None and done > 0:
            self.flow = (now, done)
        if self.bar is not None:
            self.bar.total = total
            self.bar.set_postfix_str(f"{self.runs_text()}, {self.time_left(done, total, now)}",
                                     refresh=False)
            self.bar.update(done - self.bar.n)
            return
        if force or now - self.shown >= self.every:
            self.shown = now
            click.echo(self.line(done, total, now), file=self.stream)

    def line(self, done: int, total: int, now: float) -> str:
        """A plain progress line: steps, runs, elapsed time and the time left at the step
        rate (``time_left``)."""
        from tqdm import tqdm

        return "progress: " + tqdm.format_meter(
            done, total, now - self.started, unit="step", postfix=self.runs_text(),
            bar_format="{percentage:3.0f}% {n_fmt}/{total_fmt} steps{postfix}, "
                       "{elapsed} elapsed, " + self.time_left(done, total, now))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_callbacks(progress: SweepProgress) -> dict:
    """``progress``'s callbacks, as ``run_sweep`` (and ``experiment.build``) take them."""
    return {"on_start": progress.on_start, "on_run": progress.on_run,
            "on_progress": progress.on_progress}


# -- one run (gradlab train) -------------------------------------------------------------------


def describe(config) -> str:
    """A one-line human description of a config."""
    sizes = "→".join(map(str, config.layer_sizes))
    return (f"{config.dataset} {sizes} {config.activation} init={config.init} "
            f"{config.optimizer} lr={config.lr} batch={config.batch_size} "
            f"epochs={config.epochs} seed={config.seed}")


def epoch_line(e: dict) -> str:
    """One finished epoch (``gradlab.train``'s ``on_epoch`` dict): losses, accuracies, time."""
    return (f"epoch {e['epoch']:>3}/{e['epochs']}  train loss {e['train_loss']:.4f} "
            f"acc {e['train_accuracy']:.2%}  test loss {e['test_loss']:.4f} "
            f"acc {e['test_accuracy']:.2%}  {e['seconds']:.2f}s")


def accuracy_text(accuracy: float | None) -> str:
    """A final test accuracy as a percentage, or ``n/a`` (none recorded, or NaN)."""
    return "n/a" if accuracy is None or accuracy != accuracy else f"{accuracy:.2%}"


def summary_line(outcome: dict, path) -> str:
    """The last line of a trained run (``tasks.run_one``'s outcome): its status, final test
    accuracy, and its steps in the time that training took."""
    extra = ""
    if outcome["status"] == "diverged":
        extra = f" at step {outcome['diverged_step']}"
    elif outcome["status"] == "failed":
        extra = f": {outcome.get('error')}"
    return (f"{outcome['status']}{extra}: final test accuracy "
            f"{accuracy_text(outcome.get('final_test_accuracy'))}, {outcome['steps']} steps "
            f"in {outcome['train_seconds']:.1f}s → {path}")
