"""The run options shared by ``gradlab train`` (one value each) and ``gradlab sweep`` (comma lists),
and the data, device, engine and jobs options of several commands.

One table serves both commands, so a new RunConfig field is added once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from .config import (
    ACTIVATIONS,
    BIAS_INITS,
    CRITERIA,
    DATASETS,
    MAX_DEPTH,
    MAX_EPOCHS,
    MAX_WIDTH,
    OPTIMIZERS,
    WEIGHT_INITS,
    ConfigError,
    RunConfig,
    parse_init,
)

MAX_THREADS = 1024  # torch threads per run: beyond any machine's cores, a typo
# the portable mode's cost, measured side by side with native (README "Rebuilding the figures")
PORTABLE_COST = "+40 to +70 % CPU time per run, measured on an AMD EPYC"


class InitSpec(click.ParamType):
    """A weight or bias init spec such as ``kaiming_normal`` or ``normal:0.5``."""

    name = "init"

    def __init__(self, bias: bool = False):
        self.bias = bias

    def convert(self, value, param, ctx):
        try:
            parse_init(value, bias=self.bias)
        except ConfigError as e:
            self.fail(str(e), param, ctx)
        return value


class CommaList(click.ParamType):
    """A comma-separated list, each item converted by ``inner`` (``3,5,10`` -> [3, 5, 10])."""

    def __init__(self, inner: click.ParamType, sep: str = ","):
        self.inner = inner
        self.sep = sep
        self.name = f"{inner.name}[{sep}...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(self.sep)]
        if not items or any(v == "" for v in items):
            self.fail(f"{value!r} has an empty item; give values separated by "
                      f"'{self.sep}'", param, ctx)
        return [self.inner.convert(v, param, ctx) for v in items]


@dataclass(frozen=True)
class Opt:
    """One run option: the RunConfig field, its click type, and its help."""

    field: str
    type: click.ParamType
    help: str
    flag: str | None = None  # the train flag, when it differs from the field name
    plural: str | None = None  # the sweep flag
    shown: str | None = None  # the default in words, where the value is None


_DEFAULTS = RunConfig()
POS_FLOAT = click.FloatRange(min=0, min_open=True)
NONNEG_FLOAT = click.FloatRange(min=0)

# In the order a user sets them: the model, then its training, then what is recorded.
RUN_OPTIONS: tuple[Opt, ...] = (
    Opt("depth", click.IntRange(1, MAX_DEPTH), "number of Linear layers, input to output"),
    Opt("width", click.IntRange(1, MAX_WIDTH), "width of every hidden layer", shown="128"),
    Opt("activation", click.Choice(ACTIVATIONS), "activation after each hidden Linear"),
    Opt("init", InitSpec(), "weight init ('default' is PyTorch's own): "
        + ", ".join(WEIGHT_INITS) + " (normal_fan_in:SW2 is N(0, SW2/fan_in), the "
        "mean-field σ_w²; orthogonal:GAIN scales an orthogonal matrix by GAIN)"),
    Opt("bias_init", InitSpec(bias=True), "bias init: " + ", ".join(BIAS_INITS)),
    Opt("dataset", click.Choice(DATASETS), "dataset (torchvision; Fashion-MNIST is also found "
        "where Debian's dataset-fashion-mnist installs it)"),
    Opt("train_size", click.IntRange(1), "use only the first N training examples",
        shown="all"),
    Opt("optimizer", click.Choice(OPTIMIZERS), "optimizer"),
    Opt("lr", POS_FLOAT, "learning rate (the tutorial uses 0.01)", plural="lrs"),
    Opt("momentum", NONNEG_FLOAT, "SGD momentum", plural="momenta"),
    Opt("weight_decay", NONNEG_FLOAT, "L2 weight decay"),
    Opt("batch_size", click.IntRange(1, 1_000_000), "examples per step"),
    Opt("epochs", click.IntRange(1, MAX_EPOCHS), "passes over the training set",
        plural="epochs"),
    Opt("seed", click.IntRange(0, 2**63 - 1), "seed of the init and the batch order"),
    Opt("clip_grad_norm", POS_FLOAT, "clip the total gradient norm to this (records keep the "
        "gradient before clipping)", shown="off"),
    Opt("criterion", click.Choice(CRITERIA), "training loss: cross_entropy (softmax), or "
        "sigmoid_bce (sigmoid outputs, binary cross-entropy summed over the outputs: "
        "Nielsen's network2.py)"),
    Opt("log_every", click.IntRange(0), "record gradients every N steps (0: off)",
        plural="log_every_list"),
    Opt("dist_every", click.IntRange(0), "record distributions (quantiles and histograms of "
        "activations, dL/dz and dL/dW per layer; dists.parquet) every N steps (0: off)",
        plural="dist_every_list"),
)
# --help sections, in the order a user sets things; options not named here are the last one.
SECTIONS = {
    "Model": ("preset", "depth", "width", "widths", "activation", "init", "bias_init"),
    "Training": ("dataset", "train_size", "standardize", "optimizer", "lr", "momentum",
                 "weight_decay", "batch_size", "epochs", "seed", "clip_grad_norm", "criterion"),
    "Recording": ("log_every", "log_spaced", "applied_updates", "dist_every",
                  "dist_log_spaced"),
}
LAST_SECTION = "Where and how"
# Flags renamed this version: the old spelling still works and is not shown in --help.
OLD_SPELLINGS = {"log_every_list": ("--log-everys",)}


class SectionedCommand(click.Command):
    """A command whose --help lists its options in ``SECTIONS``, in that order."""

    def format_options(self, ctx, formatter):
        records: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                records.setdefault(section_of(param.name), []).append(record)
        for title in (*SECTIONS, LAST_SECTION):
            if records.get(title):
                with formatter.section(title):
                    formatter.write_dl(records[title])


def section_of(name: str) -> str:
    return next((title for title, names in SECTIONS.items() if name in names), LAST_SECTION)


class Option(click.Option):
    """An option whose default in words (``show_default="3,5,10"``) reads as such in --help,
    not in click's parentheses."""

    def get_help_record(self, ctx):
        record = super().get_help_record(ctx)
        if record is None or not isinstance(self.show_default, str):
            return record
        words = self.show_default
        return record[0], record[1].replace(f"default: ({words})", f"default: {words}")


class Aliased(Option):
    """An option whose further spellings (a singular, a renamed flag) work but are not shown
    in --help."""

    def get_help_record(self, ctx):
        shown, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(opt: Opt) -> Any:
    # width and depth: None, so that --widths alone gives a net's widths and depth
    return None if opt.field in ("width", "depth") else getattr(_DEFAULTS, opt.field, None)


def _show_default(opt: Opt) -> bool | str:
    if opt.field == "depth":
        return f"{_DEFAULTS.depth}, or one more than --widths' values"
    return opt.shown or _default(opt) is not None


def _sweep_default(opt: Opt) -> bool | str:
    """What --help shows as a sweep option's default: the story preset's value, else
    gradlab train's."""
    from .presets import story_default

    story = story_default(opt.field)
    if story is not None:
        return f"{story}"
    value = _default(opt)
    return opt.shown or (False if value is None else str(value))


def _renamed(new: str, meaning: str):
    """A click callback for a flag that is spelled differently now: one line naming the new
    spelling (the value is never read the old way)."""
    def fail(ctx, param, value):
        if value is not None:
            raise click.UsageError(f"{param.opts[0]} is now {new}: {meaning}")
        return value
    return fail


def _add(command, opts: list[tuple[str, ...]], kwargs: list[dict]):
    """Apply click options in reverse, so that --help lists them in the given order."""
    for names, extra in reversed(list(zip(opts, kwargs, strict=True))):
        command = click.option(*names, **extra)(command)
    return command


def _flags(sweep: bool) -> dict[str, tuple]:
    """The on/off options of both commands (``sweep``: its help points to train's)."""
    see = " (see gradlab train --help)" if sweep else ""
    return {
        "standardize": (("--standardize/--no-standardize",), dict(
            default=False, show_default=True,
            help="standardise inputs instead of only scaling them into 0–1")),
        "log_spaced": (("--log-spaced",), dict(
            is_flag=True, default=False,
            help="record log-spaced steps" + (see or " (about 20 per decade) instead of every "
                                                     "--log-every steps (long runs)"))),
        "applied_updates": (("--applied-updates",), dict(
            is_flag=True, default=False,
            help="also record applied_update_ratio, the change of the weights as stored "
                 "(costs a weight copy per recorded step)")),
        "dist_log_spaced": (("--dist-log-spaced",), dict(
            is_flag=True, default=False,
            help="record distributions at about 20 log-spaced steps per decade instead of "
                 "every --dist-every steps")),
    }


def train_options(command):
    """Decorate ``gradlab train`` with one option per RunConfig field, model first."""
    specs = {opt.field: ((_flag(opt.flag or opt.field), opt.field),
                         dict(cls=Option, type=opt.type, default=_default(opt),
                              show_default=_show_default(opt), help=opt.help))
             for opt in RUN_OPTIONS}
    specs["widths"] = (("--widths", "widths"), dict(
        type=CommaList(click.IntRange(1, MAX_WIDTH)), default=None,
        help=WIDTHS_HELP + ", e.g. 128,256 for the tutorial's net"))
    specs.update(_flags(sweep=False))
    return _add_in_sections(command, specs)


WIDTHS_HELP = "one net's hidden widths, input side first (depth-1 values; they give the depth)"


def _add_in_sections(command, specs: dict[str, tuple]):
    order = [name for names in SECTIONS.values() for name in names if name in specs]
    return _add(command, [specs[n][0] for n in order], [specs[n][1] for n in order])


def sweep_options(command):
    """Decorate ``gradlab sweep`` with ``--preset`` and a comma-list option per RunConfig
    field, model first; each also takes its singular spelling (``--depth 10``). An option not
    given is None here: ``gradlab.presets.sweep_grids`` fills in the preset's values.

    ``--widths`` means what it means to ``gradlab train``: one net's hidden widths (several
    nets separated by ';'); a list of widths, each for every hidden layer, is ``--width``."""
    from .presets import PRESET_HELP, PRESETS

    specs = {"preset": (("--preset", "preset"), dict(
        type=click.Choice(PRESETS), default=PRESETS[0], show_default=True, help=PRESET_HELP))}
    for opt in RUN_OPTIONS:
        plural = "width" if opt.field == "width" else opt.plural or opt.field + "s"
        names = [_flag(plural), *OLD_SPELLINGS.get(plural, ())]
        if opt.field != plural:
            names.append(_flag(opt.field))
        specs[opt.field] = ((*names, opt.field), dict(
            cls=Aliased, type=CommaList(opt.type), default=None,
            show_default=_sweep_default(opt), help=f"comma list: {opt.help}"))
    specs["widths"] = (("--widths", "widths"), dict(
        type=CommaList(CommaList(click.IntRange(1, MAX_WIDTH)), sep=";"), default=None,
        help=WIDTHS_HELP + ", as in gradlab train; several nets separated by ';', e.g. "
             "'128,256;64,64'"))
    specs.update(_flags(sweep=True))
    command = click.option(
        "--layer-widths", hidden=True, expose_value=False, default=None,
        callback=_renamed("--widths", "one net's hidden widths, as in gradlab train "
                          "(several nets separated by ';')"))(command)
    return _add_in_sections(command, specs)


def grid_from_options(values: dict[str, Any]) -> dict[str, Any]:
    """The run-option values of a parsed command as a grid (field -> value or list)."""
    keys = {opt.field for opt in RUN_OPTIONS} | {"widths", *_flags(sweep=False)}
    return {k: v for k, v in values.items() if k in keys and v is not None}


# -- the options of several commands: data, device, engine, jobs ------------------------------


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


def device_option(f):
    return click.option("--device", type=Device(), default="auto",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")(f)


def engine_option(f):
    from .config import ENGINE_HELP, ENGINES

    text = "; ".join(f"{name}: {ENGINE_HELP[name]}" for name in ENGINES)
    return click.option("--engine", type=click.Choice(ENGINES), default=None,
                        help=f"how runs are trained; part of the run's config, so the two "
                             f"engines' runs never share a run id [default: autograd; fused "
                             f"with --ensemble]. {text}")(f)


def jobs_options(f):
    """``--jobs`` and ``--threads`` of the commands that train many runs."""
    import os

    try:  # as gradlab.sweep.cores, which --help cannot import (it loads pandas)
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    f = click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1,
                     help="torch threads per run, whatever --jobs is, so that records do not "
                          "depend on how many runs train at once")(f)
    return click.option("--jobs", "-j", type=click.IntRange(1), default=cores,
                        show_default="this machine's cores",
                        help="runs at once, each in its own process (or Ray task)")(f)


def portable_option(default: bool):
    """``--portable/--native``: the portable CPU mode (``gradlab.portable``), on or off."""
    return click.option(
        "--portable/--native", default=default, show_default=True,
        help="portable: pin MKL (MKL_CBWR=COMPATIBLE), ATen (AVX2), numba (x86-64-v3) and "
             "numpy to code paths that every x86-64 CPU with AVX2 runs alike, so that the same "
             "config gives the same records on any such CPU, Intel or AMD (" + PORTABLE_COST
             + "); native: the fastest paths for this CPU, the same records only on CPUs "
             "like it")
