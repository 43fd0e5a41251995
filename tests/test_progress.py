"""The sweep's progress: steps across every run to train with an ETA, plain lines (no redraws)
when stderr is not a terminal; and --help in sections, one default per option."""

from __future__ import annotations

import io
import re

import click

from gradlab.cli import cli
from gradlab.config import make_config
from gradlab.options import LAST_SECTION, SECTIONS
from gradlab.progress import SweepProgress, planned_steps, progress_callbacks


def configs():
    return [make_config(depth=d, width=8, epochs=2, train_size=640, batch_size=64)
            for d in (2, 3)]


def test_planned_steps_are_epochs_times_batches():
    assert planned_steps(make_config(epochs=2, train_size=650, batch_size=64)) == 2 * 11
    assert planned_steps(make_config(epochs=1, batch_size=64)) == 938  # 60,000 examples


def test_plain_lines_count_steps_across_runs(tmp_path):
    stream = io.StringIO()
    runs = configs()
    progress = SweepProgress(runs, tmp_path, stream=stream, every=0)
    progress.on_start(2, 0)
    a, b = (c.run_id() for c in runs)
    progress.on_progress(a, 10, 20)
    progress.on_progress(b, 5, 20)
    assert progress.steps == (15, 40)
    progress.on_run(runs[0], {"status": "complete", "run_id": a, "final_test_accuracy": 0.5,
                              "seconds": 1.0})
    assert progress.steps == (25, 40)
    text = stream.getvalue()
    assert "\r" not in text, "no redraws in a log"
    lines = text.splitlines()
    assert lines[0].endswith("0 already finished, 2 to train")
    assert lines[1].startswith("progress:  25% 10/40 steps, 0/2 runs")
    assert "left" in lines[1]
    assert lines[3].startswith("complete") and a in lines[3]
    assert lines[4].startswith("progress:  62% 25/40 steps, 1/2 runs")


def test_plain_lines_are_spaced_in_time(tmp_path):
    stream = io.StringIO()
    runs = configs()
    progress = SweepProgress(runs, tmp_path, stream=stream, every=3600)
    progress.on_start(2, 0)
    for done in range(1, 20):
        progress.on_progress(runs[0].run_id(), done, 20)
    assert len(stream.getvalue().splitlines()) == 1  # only the first line: no time has passed


def test_without_per_step_reports_a_run_counts_when_it_ends(tmp_path):
    runs = configs()
    progress = SweepProgress(runs, tmp_path, stream=io.StringIO(), every=0)
    progress.on_start(2, 0)
    progress.on_run(runs[1], {"status": "diverged", "run_id": runs[1].run_id(),
                              "diverged_step": 3})
    assert progress.steps == (20, 40)


def test_callbacks_are_those_that_sweeps_and_experiments_take(tmp_path):
    """``progress_callbacks`` feeds ``run_sweep`` and ``experiment.build`` alike: every callback
    it gives is a parameter of both (so per-step progress reaches ``gradlab figures`` too)."""
    import inspect

    from gradlab.experiment import build
    from gradlab.sweep import run_sweep

    progress = SweepProgress(configs(), tmp_path)
    callbacks = progress_callbacks(progress)
    assert set(callbacks) == {"on_start", "on_run", "on_progress"}
    for runner in (run_sweep, build):
        assert set(callbacks) <= set(inspect.signature(runner).parameters), runner.__name__


def help_text(command: str) -> str:
    with click.Context(cli) as ctx:
        sub = cli.commands[command]
        return sub.get_help(click.Context(sub, info_name=command, parent=ctx))


def test_help_is_in_sections_with_one_default_each():
    for command in ("train", "sweep"):
        text = help_text(command)
        heads = [line.rstrip(":") for line in text.splitlines() if line.endswith(":")
                 and not line.startswith(" ")]
        assert heads == [*SECTIONS, LAST_SECTION], (command, heads)
        flat = " ".join(text.split())
        assert not re.search(r"\] \[default|\[default:[^\]]*\] \[", flat), command
        assert flat.count("[default:") == flat.count("default:"), command
    text = help_text("sweep")
    assert "--log-every-list" in text and "--log-everys" not in text
    assert text.index("--depths") < text.index("--lrs") < text.index("--log-every-list") \
        < text.index("--jobs")


def test_sweep_takes_singular_and_old_spellings():
    sweep = cli.commands["sweep"]
    ctx = sweep.make_context("sweep", ["--depth", "3,5", "--train-size", "100",
                                       "--log-everys", "5"])
    assert ctx.params["depth"] == [3, 5] and ctx.params["train_size"] == [100]
    assert ctx.params["log_every"] == [5]
