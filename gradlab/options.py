"""The run options shared by ``gradlab train`` (one value each) and ``gradlab sweep`` (comma lists).

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


_DEFAULTS = RunConfig()
POS_FLOAT = click.FloatRange(min=0, min_open=True)
NONNEG_FLOAT = click.FloatRange(min=0)

RUN_OPTIONS: tuple[Opt, ...] = (
    Opt("dataset", click.Choice(DATASETS), "dataset (torchvision; Fashion-MNIST is also found "
        "where Debian's dataset-fashion-mnist installs it)"),
    Opt("depth", click.IntRange(1, MAX_DEPTH), "number of Linear layers, input to output"),
    Opt("width", click.IntRange(1, MAX_WIDTH), "width of every hidden layer [default: 128]"),
    Opt("activation", click.Choice(ACTIVATIONS), "activation after each hidden Linear"),
    Opt("init", InitSpec(), "weight init: " + ", ".join(WEIGHT_INITS)),
    Opt("bias_init", InitSpec(bias=True), "bias init: " + ", ".join(BIAS_INITS)),
    Opt("optimizer", click.Choice(OPTIMIZERS), "optimizer"),
    Opt("lr", POS_FLOAT, "learning rate (the tutorial uses 0.01)", plural="lrs"),
    Opt("momentum", NONNEG_FLOAT, "SGD momentum", plural="momenta"),
    Opt("weight_decay", NONNEG_FLOAT, "L2 weight decay"),
    Opt("batch_size", click.IntRange(1, 1_000_000), "examples per step"),
    Opt("epochs", click.IntRange(1, MAX_EPOCHS), "passes over the training set",
        plural="epochs"),
    Opt("seed", click.IntRange(0, 2**63 - 1), "seed of the init and the batch order"),
    Opt("clip_grad_norm", POS_FLOAT, "clip the total gradient norm to this (records keep the "
        "gradient before clipping) [default: off]"),
    Opt("train_size", click.IntRange(1), "use only the first N training examples "
        "[default: all]"),
    Opt("log_every", click.IntRange(0), "record gradients every N steps (0: off)"),
    Opt("criterion", click.Choice(CRITERIA), "training loss: cross_entropy (softmax), or "
        "sigmoid_bce (sigmoid outputs, binary cross-entropy summed over the outputs: "
        "Nielsen's network2.py)"),
    Opt("dist_every", click.IntRange(0), "record distributions (quantiles and histograms of "
        "activations, dL/dz and dL/dW per layer; dists.parquet) every N steps (0: off)"),
)
DIST_SPACED_HELP = ("record distributions at about 20 log-spaced steps per decade instead of "
                    "every --dist-every steps")


APPLIED_HELP = ("also record applied_update_ratio, the change of the weights as stored "
                "(costs a weight copy per recorded step)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(opt: Opt) -> Any:
    return None if opt.field == "width" else getattr(_DEFAULTS, opt.field, None)


def train_options(command):
    """Decorate ``gradlab train`` with one option per RunConfig field."""
    for opt in reversed(RUN_OPTIONS):
        default = _default(opt)
        command = click.option(_flag(opt.flag or opt.field), opt.field, type=opt.type,
                               default=default, show_default=default is not None,
                               help=opt.help)(command)
    command = click.option("--widths", "widths", type=CommaList(click.IntRange(1, MAX_WIDTH)),
                           default=None,
                           help="hidden widths per layer, input side first (depth-1 values), "
                                "e.g. 128,256 for the tutorial's net")(command)
    command = click.option("--standardize/--no-standardize", default=False, show_default=True,
                           help="standardise inputs instead of only scaling to [0,1]")(command)
    command = click.option("--log-spaced", is_flag=True, default=False,
                           help="record about 20 log-spaced steps per decade instead of "
                                "every --log-every steps (for long runs)")(command)
    command = click.option("--applied-updates", is_flag=True, default=False,
                           help=APPLIED_HELP)(command)
    command = click.option("--dist-log-spaced", is_flag=True, default=False,
                           help=DIST_SPACED_HELP)(command)
    return command


def sweep_options(command):
    """Decorate ``gradlab sweep`` with a comma-list option per RunConfig field."""
    for opt in reversed(RUN_OPTIONS):
        plural = opt.plural or opt.field + "s"
        default = _default(opt)
        command = click.option(_flag(plural), opt.field, type=CommaList(opt.type),
                               default=None if default is None else str(default),
                               show_default=default is not None,
                               help=f"comma list: {opt.help}")(command)
    command = click.option("--layer-widths", "widths",
                           type=CommaList(CommaList(click.IntRange(1, MAX_WIDTH)), sep=";"),
                           default=None,
                           help="per-layer hidden widths to sweep, lists separated by ';', "
                                "e.g. '128,256;64,64' (instead of --widths)")(command)
    command = click.option("--standardize/--no-standardize", default=False, show_default=True,
                           help="standardise inputs instead of only scaling to [0,1]")(command)
    command = click.option("--log-spaced", is_flag=True, default=False,
                           help="record log-spaced steps (see gradlab train --help)")(command)
    command = click.option("--applied-updates", is_flag=True, default=False,
                           help=APPLIED_HELP)(command)
    command = click.option("--dist-log-spaced", is_flag=True, default=False,
                           help=DIST_SPACED_HELP)(command)
    return command


def grid_from_options(values: dict[str, Any]) -> dict[str, Any]:
    """The run-option values of a parsed command as a grid (field -> value or list)."""
    keys = {opt.field for opt in RUN_OPTIONS} | {"widths", "standardize", "log_spaced",
                                                  "applied_updates",
                                                  "dist_log_spaced"}
    return {k: v for k, v in values.items() if k in keys and v is not None}
