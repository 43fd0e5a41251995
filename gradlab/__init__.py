"""gradlab: gradient diagnostics for multilayer perceptrons on MNIST.

gradlab trains MLPs at any depth, width, activation and initialisation, records per-layer
gradient statistics with hooks on every ``nn.Linear`` while they train, stores every record as
tidy Parquet, and draws the figures that show sigmoid gradients vanishing with depth while
ReLU's (with a fitting init) do not. The command line (``gradlab --help``) trains, sweeps, draws
and reports; in Python:

    import gradlab
    results = gradlab.load("results/quickstart")   # tidy frames: .grads .epochs .runs
    gradlab.plots.vanishing_ratio(results.grads)    # a seaborn-style figure function
    gradlab.tables.final_accuracy_table(results.epochs, results.runs)

Public API:

    gradlab.watch(model, optimizer, log_every=10)
                                records any model's layers around your own, unchanged training
                                loop (a context manager: ``rec.flush()``, ``rec.save(out, ...)``)
    gradlab.GradientRecorder    the explicit per-step recorder, for loops without an optimizer
    gradlab.load(path)          a results folder as tidy pandas frames (``gradlab.store.Results``)
    gradlab.plots               figure functions named as the figures of ``gradlab plot``:
                                grad_norm_by_layer, grad_norm_over_steps, vanishing_ratio,
                                act_grad_by_layer, accuracy_by_epoch, saturation_over_steps;
                                write_figures(results_dir) draws them all to files
    gradlab.tables              the numbers behind them: vanishing_ratios, vanishing_table,
                                final_accuracy, final_accuracy_table, verdict
    gradlab.report              write_report(results_dir): the HTML report
    gradlab.config              RunConfig and make_config: one run's settings
    gradlab.train               train(config, ...): one run, no file I/O
    gradlab.sweep               run_sweep(configs, out, ...): many runs, resumable
    gradlab.experiment          experiment specs (experiments/*.toml) and their figures

Columns and the results layout are described in README.md ("Recorded columns", "Figures and
report").
"""

from .startup import install_if_command

install_if_command()  # first, so that a Ctrl-C during the imports below is one line

from importlib import import_module  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("gradlab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

# Modules named in the docstring, imported on first use so that ``import gradlab`` (and
# ``gradlab --help``) stays fast: pandas, seaborn and torch load only when asked for.
SUBMODULES = ("plots", "tables", "report", "config", "train", "sweep", "experiment", "store")


def load(path, **kwargs):
    """Load a results folder into tidy frames (``.grads``, ``.epochs``, ``.dists``, ``.runs``);
    see ``gradlab.store.load``."""
    from .store import load as load_results

    return load_results(path, **kwargs)


def watch(model, optimizer=None, log_every=10, **kwargs):
    """Record a model's gradients around an unmodified training loop (``gradlab.record``)."""
    from .record import watch as watch_model

    return watch_model(model, optimizer, log_every, **kwargs)


def __getattr__(name):
    if name == "GradientRecorder":  # imported on first use: ``import gradlab`` stays light
        from .record import GradientRecorder

        return GradientRecorder
    if name in SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "GradientRecorder", *SUBMODULES])


__all__ = ["GradientRecorder", "__version__", "load", "plots", "tables", "watch"]
