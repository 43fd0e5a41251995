"""The ``gradlab`` command line: a thin click group; logic lives in the library modules.

Heavy imports (torch, pandas, seaborn) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import click

from .options import grid_from_options, sweep_options, train_options

# Errors the library raises for bad input; each message is one line. Imported lazily by name so
# that this module stays light.
USER_ERRORS = ("ConfigError", "DataError", "StoreError", "SpecError", "SweepError")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM inside a command, carried past click's own handler (which would print
    "Aborted!" and exit 1) so that ``Group.main`` can exit 130 (143 for SIGTERM)."""

    def __init__(self, code: int = 130):
        super().__init__(code)
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``timeout`` send), raised where Ctrl-C would be, so that
    both stop a command the same way: writers clean up, workers are stopped, finished runs
    are kept."""


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
        except Exception as e:
            if type(e).__name__ in USER_ERRORS:
                click.echo(f"Error: {e}", err=True)
                sys.exit(2)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command shows it: one line, without the source line it came from."""
    text = str(message).strip().splitlines()
    return f"Warning: {text[0] if text else category.__name__}\n"


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
      gradlab sweep --depths 3,5,10 --activations sigmoid,relu --seeds 0,1,2
      gradlab report results/sweep

    Data: --data-dir, else $GRADLAB_DATA, else ./data (torchvision's layout, <root>/MNIST/raw/).
    """


def data_dir_option(f):
    return click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="dataset root [default: $GRADLAB_DATA, else ./data]")(f)


class Device(click.ParamType):
    """A torch device name: auto, cpu, cuda, cuda:N or mps."""

    name = "device"
    PATTERN = r"auto|cpu|mps|cuda(:\d+)?"

    def convert(self, value, param, ctx):
        import re

        if not re.fullmatch(self.PATTERN, str(value)):
            self.fail(f"{value!r} is not a device: auto, cpu, cuda, cuda:N or mps", param, ctx)
        return str(value)


def check_device(device: str) -> None:
    """Refuse a device that this machine lacks, before anything is written (``auto`` and
    ``cpu`` always work)."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device == "mps":
        ok = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        count = "no MPS device"
    else:
        index = int(device.partition(":")[2] or 0)
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ok, count = index < n, f"{n} CUDA device{'s' if n != 1 else ''}"
    if not ok:
        raise click.BadParameter(f"{device} is not available here (torch sees {count}): use "
                                 f"auto or cpu", param_hint="'--device'")


def engine_option(f):
    from .config import ENGINE_HELP, ENGINES

    text = "; ".join(f"{name}: {ENGINE_HELP[name]}" for name in ENGINES)
    return click.option("--engine", type=click.Choice(ENGINES), default=None,
                        help=f"how runs are trained; part of the run's config, so the two "
                             f"engines' runs never share a run id [default: autograd; fused "
                             f"with --ensemble]. {text}")(f)


def device_option(f):
    return click.option("--device", type=Device(), default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")(f)


@cli.command()
@train_options
@click.option("--out", type=click.Path(), default="results", help="results root")
@data_dir_option
@device_option
@engine_option
@click.option("--threads", type=click.IntRange(1), default=1,
              help="torch threads, as for each run of a sweep: float32 matmuls can round "
                   "differently at other thread counts, and the same config must give the same "
                   "records whichever command trained it")
@click.option("--force", is_flag=True, help="train again even if this run is complete")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or per-epoch lines")
def train(out, data_dir, device, engine, threads, force, quiet, **options):
    """Train one configuration and store it under OUT/runs/<run_id>/.

    The defaults train the tutorial's sigmoid net shape at depth 3 (width 128); the tutorial's
    exact recipe is --depth 3 --widths 128,256 --lr 0.01 --batch-size 64 --epochs 10.
    Prints one line per epoch and a summary; the records are config.json, grads.parquet,
    epochs.parquet and status.json.
    """
    from .config import make_config
    from .data import ensure_data, resolve_data_dir
    from .locks import LOCKED, run_lock
    from .runner import execute
    from .store import ensure_out, run_dir
    from .tasks import ready

    config = make_config(**grid_from_options(options), engine=engine)
    check_device(device)
    ensure_data(config.dataset, resolve_data_dir(data_dir), config.train_size)
    ensure_out(out)
    path = run_dir(out, config.run_id())

    def on_epoch(e: dict) -> None:
        if not quiet:
            click.echo(f"epoch {e['epoch']:>3}/{e['epochs']}  train loss {e['train_loss']:.4f} "
                       f"acc {e['train_accuracy']:.2%}  test loss {e['test_loss']:.4f} "
                       f"acc {e['test_accuracy']:.2%}  {e['seconds']:.2f}s")

    # the run's lock, as a sweep takes it: one process at a time trains a run
    with run_lock(out, config.run_id()) as locked:
        if not locked:
            raise click.ClickException(f"run {config.run_id()} is {LOCKED} (another gradlab "
                                       f"process holds its lock): nothing trained; run this "
                                       f"again when it is done")
        stored, damage = ready(out, config.run_id())
        if stored is not None and stored["status"] == "complete" and not force:
            acc = stored.get("final_test_accuracy")
            click.echo(f"run {config.run_id()} is already complete in {path} (final test "
                       f"accuracy {'n/a' if acc is None else f'{acc:.2%}'}); use --force to "
                       f"train it again")
            return 0
        if damage:
            click.echo(f"run {config.run_id()} was damaged: {damage}; training it again",
                       err=True)
        if not quiet:
            click.echo(f"run {config.run_id()}: {describe(config)}", err=True)

        import torch

        torch.set_num_threads(threads)
        status = execute(config, out, data_dir=data_dir, device=device, progress=not quiet,
                         on_epoch=on_epoch)
    click.echo(summary_line(status, path))
    return 0 if status["status"] == "complete" else 1


def jobs_options(f):
    """``--jobs`` and ``--threads`` of the commands that train many runs."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    f = click.option("--threads", type=click.IntRange(1), default=1,
                     help="torch threads per run, whatever --jobs is, so that records do not "
                          "depend on how many runs train at once")(f)
    return click.option("--jobs", "-j", type=click.IntRange(1), default=cores,
                        help="runs at once, each in its own process (or Ray task) "
                             "[default: this machine's cores]")(f)


@cli.command()
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
@click.option("--report", "make_report", is_flag=True,
              help="write the HTML report of OUT when the sweep ends")
def sweep(out, jobs, threads, executor, ray_address, data_dir, device, engine, ensemble,
          make_report, **options):
    """Train every combination of the comma-list options into OUT/runs/<run_id>/.

    Runs already complete (or diverged) are skipped, unfinished and failed ones are trained
    (again), so the same command resumes an interrupted sweep; a run that another gradlab
    process is training is skipped as "running elsewhere". Ends with final test accuracy and
    vanishing ratio (median over steps of |grad W| of layer 0 / last layer) per configuration,
    mean ± sd over seeds. Exit status 0 when every run is complete, else 1.

    \b
    Example: gradlab sweep --depths 3,5,10 --activations sigmoid,relu --seeds 0,1,2 -j 2
    """
    from .config import expand_grid
    from .sweep import format_summary, run_sweep, sweep_summary

    if ensemble and engine not in (None, "fused"):
        raise click.UsageError("--ensemble trains with the fused engine: drop --engine "
                               f"{engine}, or --ensemble")
    engine = "fused" if ensemble else engine
    configs = expand_grid({**grid_from_options(options), "engine": engine or "autograd"})
    if executor == "local" or ray_address is None:  # a Ray cluster may have devices that
        check_device(device)                          # this machine lacks
    with SweepProgress(configs, out) as progress:
        result = run_sweep(configs, out, jobs=jobs, threads=threads, executor=executor,
                           ray_address=ray_address, data_dir=data_dir, device=device,
                           ensemble=ensemble, on_start=progress.on_start,
                           on_run=progress.on_run)
    click.echo(format_summary(sweep_summary(out, [c.run_id() for c in configs])))
    for line in result.repaired():  # damaged runs, trained again
        click.echo(line)
    echo_problems(result, out)
    if make_report:
        try:
            from .report import write_report
        except ImportError as e:
            raise click.ClickException(f"--report is not available: {e}") from None
        click.echo(f"report: {write_report(out)}")
    return 0 if result.ok else 1


class SweepProgress:
    """A tqdm bar of runs on stderr, with one line per finished run (for sweep and figures)."""

    def __init__(self, configs, out):
        self.configs, self.out, self.bar = configs, out, None

    def on_start(self, todo: int, skipped: int) -> None:
        from tqdm.auto import tqdm

        click.echo(f"{len(self.configs)} runs into {self.out}: {skipped} already finished, "
                   f"{todo} to train", err=True)
        if todo:
            self.bar = tqdm(total=todo, unit="run", file=sys.stderr, dynamic_ncols=True)

    def on_run(self, config, outcome: dict) -> None:
        from .sweep import outcome_line

        self.bar.write(outcome_line(config, outcome, self.configs), file=sys.stderr)
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


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


def describe(config) -> str:
    """A one-line human description of a config."""
    sizes = "→".join(map(str, config.layer_sizes))
    return (f"{config.dataset} {sizes} {config.activation} init={config.init} "
            f"{config.optimizer} lr={config.lr} batch={config.batch_size} "
            f"epochs={config.epochs} seed={config.seed}")


def summary_line(status: dict, path) -> str:
    acc = status.get("final_test_accuracy")
    acc_text = "n/a" if acc is None or acc != acc else f"{acc:.2%}"
    extra = ""
    if status["status"] == "diverged":
        extra = f" at step {status['diverged_step']}"
    elif status["status"] == "failed":
        extra = f": {status.get('error')}"
    return (f"{status['status']}{extra}: final test accuracy {acc_text}, {status['steps']} steps "
            f"in {status['seconds']:.1f}s → {path}")


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
              help="draw only this figure (repeatable, or comma-separated): grad_norm_by_layer, "
                   "grad_norm_over_steps, vanishing_ratio, act_grad_by_layer, "
                   "accuracy_by_epoch, saturation_over_steps")
def plot(results, formats, only):
    """Draw the figures of a results folder into RESULTS/figures/NAME.FORMAT and list them.

    The same records give byte-identical files. Damaged or unfinished runs are named on stderr
    and left out.
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
    """Write RESULTS/report.html: one self-contained page with the figures, final test accuracy
    and vanishing ratio per activation × depth, each run's status, and the provenance."""
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
def figures(spec, out, jobs, threads, data_dir, device):
    """Rebuild an experiment's figures from its TOML SPEC (e.g. experiments/vanishing.toml).

    Trains the runs that are missing (resumable, as a sweep), then writes figures/, summary.csv,
    summary.md and manifest.json (run_ids, content hash of the records behind each figure,
    versions, git SHA) to OUT. The same spec gives the same figure bytes and tables.
    """
    from .experiment import build, load_spec

    experiment = load_spec(spec)
    check_device(device)
    configs = experiment.configs()
    out = out or f"results/{experiment.name}"
    with SweepProgress(configs, out) as progress:
        manifest = echo_warnings(lambda: build(experiment, out, jobs=jobs, threads=threads,
                                               data_dir=data_dir, device=device,
                                               on_start=progress.on_start,
                                               on_run=progress.on_run))
    click.echo((Path(out) / "summary.md").read_text().split("```")[1].strip("\n"))
    for name in manifest["figures"]:
        click.echo(str(Path(out) / name))
    bad = {k: v for k, v in manifest["statuses"].items() if v != "complete"}
    for run_id, status in sorted(bad.items()):
        click.echo(f"  {run_id}: {status}")
    # a diverged run is a result (exploding.toml shows them); a failed one is an error
    return 1 if "failed" in bad.values() else 0
