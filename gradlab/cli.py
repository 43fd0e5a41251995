"""The ``gradlab`` command line: a thin click group; logic lives in the library modules.

Heavy imports (torch, pandas, seaborn) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import sys

import click

from .options import grid_from_options, train_options

# Errors the library raises for bad input; each message is one line. Imported lazily by name so
# that this module stays light.
USER_ERRORS = ("ConfigError", "DataError", "StoreError", "SpecError")


class Group(click.Group):
    """A click group whose every error is one line on stderr: no usage block, no traceback."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted: finished runs are kept; run the same command again to "
                       "resume.", err=True)
            sys.exit(130)
        except Exception as e:
            if type(e).__name__ in USER_ERRORS:
                click.echo(f"Error: {e}", err=True)
                sys.exit(2)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


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


def device_option(f):
    return click.option("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")(f)


@cli.command()
@train_options
@click.option("--out", type=click.Path(), default="results", help="results root")
@data_dir_option
@device_option
@click.option("--force", is_flag=True, help="train again even if this run is complete")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar or per-epoch lines")
def train(out, data_dir, device, force, quiet, **options):
    """Train one configuration and store it under OUT/runs/<run_id>/.

    The defaults train the tutorial's sigmoid net shape at depth 3 (width 128); the tutorial's
    exact recipe is --depth 3 --widths 128,256 --lr 0.01 --batch-size 64 --epochs 10.
    Prints one line per epoch and a summary; the records are config.json, grads.parquet,
    epochs.parquet and status.json.
    """
    from .config import make_config
    from .data import ensure_raw, resolve_data_dir
    from .runner import execute
    from .store import ensure_out, is_complete, read_status, run_dir

    config = make_config(**grid_from_options(options))
    ensure_raw(config.dataset, resolve_data_dir(data_dir))
    ensure_out(out)
    path = run_dir(out, config.run_id())
    if is_complete(out, config.run_id()) and not force:
        status = read_status(path)
        click.echo(f"run {config.run_id()} is already complete in {path} (final test accuracy "
                   f"{status['final_test_accuracy']:.2%}); use --force to train it again")
        return 0
    if not quiet:
        click.echo(f"run {config.run_id()}: {describe(config)}", err=True)

    def on_epoch(e: dict) -> None:
        if not quiet:
            click.echo(f"epoch {e['epoch']:>3}/{e['epochs']}  train loss {e['train_loss']:.4f} "
                       f"acc {e['train_accuracy']:.2%}  test loss {e['test_loss']:.4f} "
                       f"acc {e['test_accuracy']:.2%}  {e['seconds']:.2f}s")

    status = execute(config, out, data_dir=data_dir, device=device, progress=not quiet,
                     on_epoch=on_epoch)
    click.echo(summary_line(status, path))
    return 0 if status["status"] == "complete" else 1


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
