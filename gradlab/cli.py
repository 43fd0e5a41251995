"""The ``gradlab`` command line: a thin click group; logic lives in the library modules.

Heavy imports (torch, pandas, seaborn) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import click

from .errors import GradlabError
from .options import (
    MAX_THREADS,
    Device,
    SectionedCommand,
    check_device,
    data_dir_option,
    device_option,
    engine_option,
    grid_from_options,
    jobs_options,
    portable_option,
    sweep_options,
    train_options,
)
from .startup import Terminated


class Interrupted(Exception):
    """Ctrl-C or SIGTERM inside a command, carried past click's own handler (which would print
    "Aborted!" and exit 1) so that ``Group.main`` can exit 130 (143 for SIGTERM)."""

    def __init__(self, code: int = 130):
        super().__init__(code)
        self.code = code


def _terminate(signum, frame):
    raise Terminated()


def install_signal_handlers() -> dict:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated (once the start-up is over);
    returns the handlers they replace."""
    return {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
            signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}


class Group(click.Group):
    """A click group whose every error is one line on stderr: no usage block, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Terminated:
            raise Interrupted(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:
            raise Interrupted() from None

    def main(self, args=None, prog_name=None, **extra):
        import warnings

        previous = install_signal_handlers() if threading_is_main() else {}
        format_warning = warnings.formatwarning
        warnings.formatwarning = one_line_warning
        try:
            self.main_with_one_line_errors(args, prog_name, **extra)
        finally:  # e.g. for CliRunner tests, which call main inside pytest
            warnings.formatwarning = format_warning
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def main_with_one_line_errors(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except (KeyboardInterrupt, Interrupted) as e:
            click.echo("Interrupted: finished runs are kept; run the same command again to "
                       "resume.", err=True)
            sys.exit(getattr(e, "code", 128 + signal.SIGTERM if isinstance(e, Terminated)
                             else 130))
        except OSError as e:
            if e.errno not in (errno.ENAMETOOLONG, errno.ENOSPC, errno.EROFS, errno.EACCES):
                raise
            from .store import shorten

            name = f" {shorten(e.filename)}" if e.filename else ""
            click.echo(f"Error: cannot use{name}: {e.strerror}", err=True)
            sys.exit(2)
        except GradlabError as e:  # bad input, said in one line by the library
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command shows it: one line, without the source line it came from."""
    text = str(message).strip().splitlines()
    return f"Warning: {text[0] if text else category.__name__}\n"


def enter_portable(in_this_process: bool = False, default: bool = False) -> bool:
    """Set the portable mode's settings (``gradlab.portable``) before the libraries load, and
    return whether the mode is on. ``in_this_process``: the command trains in its own process,
    so the settings must be in effect here; ``default``: the mode was not asked for, so a CPU
    that cannot run it gets a warning and the native mode instead of an error."""
    from .portable import PortableError, enter, leave, unavailable

    if default and unavailable() is not None:
        click.echo(f"Warning: {unavailable()}: building in the native mode (its records "
                   f"match only CPUs like this one)", err=True)
        return False
    try:
        in_effect, previous = enter()
    except PortableError as e:
        raise click.UsageError(str(e)) from None
    click.get_current_context().call_on_close(lambda: leave(previous))
    if not in_effect and in_this_process:
        raise click.UsageError("--portable must be set before torch loads, and it has "
                               "loaded here: run gradlab as a command, or drop --portable")
    return True


def threading_is_main() -> bool:
    """Whether this is the main thread (the only one that may set signal handlers)."""
    import threading

    return threading.current_thread() is threading.main_thread()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "show_default": True})
@click.version_option(package_name="gradlab")
def cli():
    """gradlab: train MNIST MLPs, record per-layer gradient statistics, and draw the figures.

    \b
    Typical use:
      gradlab train --depth 3 --widths 128,256 --activation relu --epochs 1
      gradlab sweep --depths 3,5,10                  (sigmoid vs ReLU, see --preset)
      gradlab report results/sweep

    Data: --data-dir, else $GRADLAB_DATA, else ./data (torchvision's layout, <root>/MNIST/raw/).
    """


@cli.command(cls=SectionedCommand)
@train_options
@click.option("--out", type=click.Path(), default="results", help="results root")
@data_dir_option
@device_option
@engine_option
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1,
              help="torch threads, as for each run of a sweep: float32 matmuls can round "
                   "differently at other thread counts, and the same config must give the same "
                   "records whichever command trained it")
@portable_option(default=False)
@click.option("--force", is_flag=True, help="train again even if this run is complete")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or per-epoch lines")
def train(out, data_dir, device, engine, threads, portable, force, quiet, **options):
    """Train one configuration and store it under OUT/runs/<run_id>/.

    The defaults train the tutorial's sigmoid net shape at depth 3 (width 128); the tutorial's
    exact recipe is --depth 3 --widths 128,256 --lr 0.01 --batch-size 64 --epochs 10.
    Prints one line per epoch and a summary; the records are config.json, grads.parquet,
    epochs.parquet and status.json.
    """
    if portable:  # first: the libraries read its settings when they load
        enter_portable(in_this_process=True)
    from .config import make_config
    from .data import ensure_data, resolve_data_dir
    from .locks import LOCKED
    from .progress import accuracy_text, describe, epoch_line, summary_line
    from .store import ensure_out, run_dir
    from .tasks import DONE_ELSEWHERE, run_one

    config = make_config(**grid_from_options(options), engine=engine)
    check_device(device)
    ensure_data(config.dataset, resolve_data_dir(data_dir), config.train_size)
    ensure_out(out)
    run_id, path = config.run_id(), run_dir(out, config.run_id())

    def on_train(damage: str | None) -> None:
        if damage:
            click.echo(f"run {run_id} was damaged: {damage}; training it again", err=True)
        if not quiet:
            click.echo(f"run {run_id}: {describe(config)}", err=True)

    # under the run's lock, as a sweep trains it: one process at a time trains a run
    outcome = run_one(config.to_dict(), out, data_dir, device, threads,
                      keep=() if force else ("complete",), progress=not quiet,
                      on_epoch=None if quiet else lambda e: click.echo(epoch_line(e)),
                      on_train=on_train)
    if outcome["status"] == LOCKED:
        raise click.ClickException(f"run {run_id} is {LOCKED} (another gradlab process holds "
                                   f"its lock): nothing trained; run this again when it is done")
    if outcome["status"] == DONE_ELSEWHERE:
        click.echo(f"run {run_id} is already complete in {path} (final test accuracy "
                   f"{accuracy_text(outcome.get('final_test_accuracy'))}); use --force to "
                   f"train it again")
        return 0
    click.echo(summary_line(outcome, path))
    return 0 if outcome["status"] == "complete" else 1


@cli.command(cls=SectionedCommand)
@sweep_options
@click.option("--out", type=click.Path(), default="results/sweep", help="results folder")
@jobs_options
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              help="local processes, or Ray tasks (pip install 'gradlab[ray]')")
@click.option("--ray-address", default=None,
              help="address of a running Ray cluster [default: start a local one]")
@data_dir_option
@device_option
@engine_option
@click.option("--ensemble", is_flag=True,
              help="train the seeds of each configuration together in one process, as one "
                   "vectorised ensemble (the fused engine with stacked members; their records "
                   "equal their runs' alone to float rounding); implies --engine fused")
@portable_option(default=False)
@click.option("--report", "make_report", is_flag=True,
              help="write the HTML report of OUT when the sweep ends")
def sweep(out, jobs, threads, executor, ray_address, data_dir, device, engine, ensemble,
          portable, make_report, preset, **options):
    """Train every combination of the comma-list options into OUT/runs/<run_id>/.

    With no option it trains the comparison gradlab is about (--preset story): sigmoid, ReLU
    with PyTorch's default init and ReLU with Kaiming init at depth 3, 5 and 10, about a minute
    on 2 cores; each option given replaces the preset's values for that option.

    Runs already complete (or diverged) are skipped, unfinished and failed ones are trained
    (again), so the same command resumes an interrupted sweep; a run that another gradlab
    process is training is skipped as "running elsewhere". Ends with final test accuracy and
    vanishing ratio (median over steps of |grad W| of layer 0 / last layer) per configuration,
    mean ± sd over seeds, the same in plain words, the figures of the vanishing ratio and the
    accuracy (OUT/figures/) and the command for the report. Exit status 0 when every run is
    complete, else 1.

    \b
    Example: gradlab sweep --depths 3,5,10 --seeds 0,1,2 -j 2
    """
    if portable:  # first: the libraries read its settings when they load
        enter_portable()
    from .config import expand_grids
    from .presets import sweep_grids, widths_note
    from .progress import SweepProgress, progress_callbacks
    from .summary import sweep_results
    from .sweep import format_summary, run_sweep, summary_table

    if ensemble and engine not in (None, "fused"):
        raise click.UsageError("--ensemble trains with the fused engine: drop --engine "
                               f"{engine}, or --ensemble")
    engine = "fused" if ensemble else engine
    given = grid_from_options(options)
    configs = expand_grids([{**grid, "engine": engine or "autograd"}
                            for grid in sweep_grids(given, preset)])
    if widths_note(given):
        click.echo(widths_note(given), err=True)
    run_ids = [c.run_id() for c in configs]
    if executor == "local" or ray_address is None:  # a Ray cluster may have devices that
        check_device(device)                          # this machine lacks
    with SweepProgress(configs, out) as progress:
        result = run_sweep(configs, out, jobs=jobs, threads=threads, executor=executor,
                           ray_address=ray_address, data_dir=data_dir, device=device,
                           ensemble=ensemble, portable=portable,
                           **progress_callbacks(progress))
    # one read of each run for the summary and the verdict, none again of those the plan read
    results = sweep_results(out, run_ids, result.folder)
    click.echo(format_summary(summary_table(results)))
    for line in result.repaired():  # damaged runs, trained again
        click.echo(line)
    echo_verdict(out, run_ids, results)
    echo_problems(result, out)
    echo_figures(out, run_ids)
    if make_report:
        try:
            from .report import write_report
        except ImportError as e:
            raise click.ClickException(f"--report is not available: {e}") from None
        click.echo(f"report: {write_report(out)}")
    else:
        import shlex

        click.echo(f"next: gradlab report {shlex.quote(str(out))}   (every figure, the tables "
                   f"and each run in one HTML page)")
    return 0 if result.ok else 1


def echo_figures(out, run_ids) -> None:
    """Draw the headline figures of the given runs into OUT/figures/ and list them."""
    from .plots import write_figures
    from .report import HEADLINE
    from .store import StoreError

    try:
        paths = echo_warnings(lambda: write_figures(out, only=HEADLINE, run_ids=run_ids))
    except StoreError as e:  # e.g. no run finished
        click.echo(f"figures: none drawn ({e})")
        return
    if paths:
        click.echo("figures:")
    for path in paths:
        click.echo(f"  {path}")


def echo_verdict(out, run_ids, results=None) -> None:
    """Print what the runs of ``out`` show, in plain words, one line per setup (``results``:
    those runs, already loaded)."""
    from .summary import results_verdict, sweep_verdict

    lines = sweep_verdict(out, run_ids) if results is None else results_verdict(results)
    if lines:
        click.echo("\nIn plain words (‖g_first‖/‖g_last‖: the first layer's gradient norm over "
                   "the last layer's; 1 = kept):")
        for line in lines:
            click.echo(f"  {line}")


def echo_problems(result, out) -> None:
    """Say how many runs of a sweep are complete, and one line for each that is not."""
    problems = result.problems()
    complete = len(result.configs) - len(problems)
    click.echo(f"{complete} of {len(result.configs)} runs complete in {out}"
               + (f"; {len(problems)} not:" if problems else ""))
    for line in problems:
        click.echo(f"  {line}")


@cli.command(name="ls")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def ls(path):
    """List the runs of a results folder: id, status, config, final test accuracy.

    Damaged runs (unreadable config.json or Parquet) and unfinished ones (no status.json) are
    named on stderr.
    """
    from .listing import format_runs, list_runs

    table, problems = list_runs(path)
    for problem in problems:
        click.echo(f"Warning: {problem}", err=True)
    click.echo(format_runs(table) if len(table) else f"no runs in {path}")
    return 0


def main() -> None:  # python -m gradlab
    cli(prog_name="gradlab")


# -- figures and report (issue 5) ------------------------------------------------------------


def echo_warnings(call):
    """Run ``call()``; each warning it raises (e.g. a damaged run file that ``gradlab.load``
    skipped) is printed as one line on stderr, and the command goes on."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return call()
        finally:
            seen = set()
            for w in caught:
                line = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
                if line and line not in seen:
                    seen.add(line)
                    click.echo(f"Warning: {line}", err=True)


@cli.command()
@click.argument("results", type=click.Path())
@click.option("--format", "formats", default="png", metavar="LIST",
              help="comma-separated file formats: png, pdf, svg")
@click.option("--only", multiple=True, metavar="NAME",
              help="draw only this figure (repeatable, or comma-separated). gradlab's MLPs: "
                   "grad_norm_by_layer, grad_norm_over_steps, vanishing_ratio, "
                   "act_grad_by_layer, accuracy_by_epoch, saturation_over_steps. Any other "
                   "model: layer_profile, grad_norm_over_steps, update_ratio_over_steps, "
                   "act_grad_by_layer, metrics_over_steps, grad_through_time")
def plot(results, formats, only):
    """Draw the figures of a results folder into RESULTS/figures/NAME.FORMAT and list them.

    A folder of gradlab's own MLPs gets figures by depth and activation; one that holds any
    other model (gradlab.watch, a framework callback) gets figures by layer name, in forward
    order. The same records give byte-identical files. Damaged or unfinished runs are named on
    stderr and left out.
    """
    from .plots import write_figures

    names = [n.strip() for item in only for n in item.split(",") if n.strip()] or None
    paths = echo_warnings(lambda: write_figures(results, formats=formats.split(","),
                                                only=names))
    for path in paths:
        click.echo(str(path))
    return 0


@cli.command()
@click.argument("results", type=click.Path())
def report(results):
    """Write RESULTS/report.html: one self-contained page with the figures, each run's status
    and the provenance. gradlab's MLPs: final test accuracy and vanishing ratio per activation
    × depth. Any other model (gradlab.watch, a framework callback): each layer's gradient norm
    and update ratio by name, the metrics it logged, and the user's own config."""
    from .report import write_report

    click.echo(str(echo_warnings(lambda: write_report(results))))
    return 0


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(), default=None,
              help="results folder [default: results/<spec name>]")
@jobs_options
@data_dir_option
@click.option("--device", type=Device(), default="cpu",
              help="where missing runs train; the committed results were made on the CPU, "
                   "whose runs are bit-for-bit reproducible")
@portable_option(default=True)
@click.option("--report", "make_report", is_flag=True,
              help="also write OUT/report.html (figures, tables, runs, provenance)")
@click.option("--check", "check_only", is_flag=True,
              help="write no figure or table to OUT: rebuild in a scratch folder (from the "
                   "records that OUT holds, if any) and compare with OUT's committed manifest, "
                   "summary and claims; exit 0 when they agree, 1 with a short list when not")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=2.0,
              help="with --check: the drift of a summary mean allowed, in its seed sd")
def figures(spec, out, jobs, threads, data_dir, device, portable, make_report, check_only,
            tolerance):
    """Rebuild an experiment's figures from its TOML SPEC (e.g. experiments/vanishing.toml).

    Trains the runs that are missing (resumable, as a sweep), then writes figures/, summary.csv,
    summary.md and manifest.json (run_ids, content hash of the records behind each figure and
    of the tables, versions, git SHA, and the machine: CPU, its flags, BLAS and its mode,
    threads, portable or native) to OUT. On a CPU, in the portable mode (the default), the same
    spec gives the same records, figure bytes and tables on every x86-64 CPU with AVX2; with
    --native, on CPUs like this one. --check says whether a rebuild here agrees with the
    committed results: "identical", or each summary number's drift in seed sd and any claim's
    changed verdict.
    """
    if portable:  # first: torch, numpy and numba read its settings when they load
        source = click.get_current_context().get_parameter_source("portable")
        portable = enter_portable(default=source == click.core.ParameterSource.DEFAULT)
    from .experiment import build, load_spec, summary_text
    from .progress import SweepProgress, progress_callbacks

    experiment = load_spec(spec)
    check_device(device)
    configs = experiment.configs()
    out = out or f"results/{experiment.name}"
    options = dict(jobs=jobs, threads=threads, data_dir=data_dir, device=device,
                   portable=portable)
    if check_only:
        return check_figures(experiment, out, tolerance, options)
    with SweepProgress(configs, out) as progress:
        manifest = echo_warnings(lambda: build(experiment, out, **options,
                                               **progress_callbacks(progress)))
    click.echo(summary_text(out))
    echo_verdict(out, [c.run_id() for c in configs])
    for name in manifest["figures"]:
        click.echo(str(Path(out) / name))
    if make_report:
        from .report import write_report

        click.echo(f"report: {echo_warnings(lambda: write_report(out))}")
    bad = {k: v for k, v in manifest["statuses"].items() if v != "complete"}
    for run_id, status in sorted(bad.items()):
        click.echo(f"  {run_id}: {status}")
    # a diverged run is a result (exploding.toml shows them); a failed one is an error
    return 1 if "failed" in bad.values() else 0


def check_figures(experiment, out, tolerance: float, options: dict) -> int:
    """``gradlab figures --check``: one line, then each drift; 0 when the rebuild agrees."""
    from .check import check, read_built
    from .progress import SweepProgress, progress_callbacks

    read_built(out)  # nothing to check against: one line before anything trains
    with SweepProgress(experiment.configs(), out) as progress:
        outcome = echo_warnings(lambda: check(experiment, out, tolerance=tolerance, **options,
                                              **progress_callbacks(progress)))
    click.echo(f"{experiment.name}: {outcome.headline}")
    for line in outcome.drifts:
        click.echo(f"  {line}")
    if outcome.problems:
        click.echo(f"disagrees with {out} ({len(outcome.problems)}):")
        for line in outcome.problems:
            click.echo(f"  {line}")
    return 0 if outcome.ok else 1


# -- export (issue 26) -----------------------------------------------------------------------


@cli.command()
@click.argument("results", type=click.Path())
@click.option("--to", "to", type=click.Choice(["tensorboard"]), required=True,
              help="the format to write")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="the folder to write: one subfolder per run")
@click.option("--overwrite", is_flag=True,
              help="replace the event files of runs that OUT already holds")
def export(results, to, out, overwrite):
    """Write the finished runs of RESULTS for another tool, and list the folders written.

    --to tensorboard: OUT/<run_id>/ event files (needs gradlab[tensorboard]) with scalars per
    recorded column and layer (grad_weight_norm/fc0), histograms of dists.parquet
    (grad_weight/fc0) and the metrics (train/loss, test/accuracy), at each run's optimizer
    step. View them with:

    \b
      tensorboard --logdir OUT
    """
    from .export import to_tensorboard

    for folder in echo_warnings(lambda: to_tensorboard(results, out, overwrite=overwrite)):
        click.echo(str(folder))
    return 0
