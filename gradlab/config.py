"""Run and sweep configuration: frozen dataclasses, validation, grid expansion, TOML and run_id."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from .activations import NAMES as ACTIVATIONS  # the registry's names
from .errors import GradlabError

WEIGHT_INITS = (
    "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
    "lecun_normal", "orthogonal", "orthogonal:GAIN", "normal:STD", "uniform:A",
    "normal_fan_in:SW2",
)
# The example in an init's error message, where 0.1 would mislead (SW2 is a variance, GAIN ~1).
_INIT_EXAMPLES = {"normal_fan_in": "1.5", "orthogonal": "1.2"}
BIAS_INITS = ("default", "zeros", "normal:STD")
OPTIMIZERS = ("sgd", "adam")
DATASETS = ("mnist", "fashion-mnist")
MAX_DEPTH = 64
MAX_WIDTH = 8192
MAX_EPOCHS = 10_000
# How a run is trained. Both give the same records to float rounding (the tests hold them to
# each other and to autograd), yet the engine is part of the config (and the run_id), so that a
# folder never mixes the two engines' records under one id.
ENGINES = ("autograd", "fused")
ENGINE_HELP = {  # for --help
    "autograd": "nn.Sequential, autograd and torch.optim, recorded by GradientRecorder's hooks "
                "(the reference)",
    "fused": "gradlab's stacked engine: a hand-written backward pass checked against autograd; "
             "on a CPU, numba kernels fold the recording into the SGD pass, do the classifier "
             "layer in one pass and skip zero pixels in the first layer; ~2x faster",
}

# Bumped when the meaning of a recorded column changes, so old and new records never share an id.
RECORD_VERSION = 1
# Fields added after version 1's configs were first hashed: each enters ``run_id``'s hash only
# when it differs from its default, so that every earlier config keeps its id (and the
# committed experiments their runs).
NEW_FIELD_DEFAULTS: dict[str, Any] = {"engine": "autograd", "applied_updates": False,
                                      "criterion": "cross_entropy",
                                      "dist_every": 0, "dist_log_spaced": False}
# The training loss (``criterion``: ``loss`` is a recorded column). ``sigmoid_bce``: sigmoid
# outputs with the binary cross-entropy summed over the 10 outputs and averaged over the batch,
# the cost of Nielsen's network2.py (its CrossEntropyCost), so that gradients compare with his
# book's in absolute value.
CRITERIA = ("cross_entropy", "sigmoid_bce")


class ConfigError(GradlabError, ValueError):
    """A configuration value is invalid; the message is one line naming it and what is allowed."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def parse_init(spec: str, *, bias: bool = False) -> tuple[str, float | None]:
    """Split an init spec like ``normal:0.1`` into (name, parameter); raise ConfigError if bad."""
    allowed = BIAS_INITS if bias else WEIGHT_INITS
    label = "bias_init" if bias else "init"
    allowed_text = "one of " + ", ".join(allowed)
    if not isinstance(spec, str):
        _fail(label, spec, allowed_text)
    name, sep, arg = spec.partition(":")
    with_arg = {a.split(":")[0] for a in allowed if ":" in a}
    example = _INIT_EXAMPLES.get(name, "0.1")
    plain = {a for a in allowed if ":" not in a}
    if not sep:
        if name in plain:
            return name, None
        if name in with_arg:
            _fail(label, spec, f"{name} needs a parameter, e.g. {name}:{example}")
        _fail(label, spec, allowed_text)
    if name not in with_arg:
        _fail(label, spec, allowed_text)
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        _fail(label, spec, f"{name}:X needs a positive number X, e.g. {name}:{example}")
    return name, value


def _canonical_init(spec: str, *, bias: bool = False) -> str:
    name, value = parse_init(spec, bias=bias)
    # orthogonal:1 draws what plain orthogonal draws (the same calls): one name, one run_id
    if value is None or (name == "orthogonal" and value == 1.0):
        return name
    return f"{name}:{value!r}"


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
        hi is not None and value > hi
    ):
        bound = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        _fail(name, value, bound)


def _check_float(name: str, value: Any, *, positive: bool) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        _fail(name, value, "a finite number " + ("> 0" if positive else ">= 0"))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(choices))


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what one training run computes (and so its ``run_id``).

    Where a run executes (device, data folder, thread count) is provenance, not config: the same
    config gives the same ``run_id`` on any machine.
    """

    dataset: str = "mnist"
    depth: int = 3
    widths: tuple[int, ...] = (128, 128)
    activation: str = "sigmoid"
    init: str = "default"
    bias_init: str = "default"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    seed: int = 0
    clip_grad_norm: float | None = None
    train_size: int | None = None
    standardize: bool = False
    log_every: int = 1
    log_spaced: bool = False
    engine: str = "autograd"
    applied_updates: bool = False  # record applied_update_ratio (a weight copy per step)
    criterion: str = "cross_entropy"
    dist_every: int = 0
    dist_log_spaced: bool = False

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_int("depth", self.depth, 1, MAX_DEPTH)
        widths = self.widths
        if isinstance(widths, int) and not isinstance(widths, bool):
            widths = (widths,) * (self.depth - 1)
        if not isinstance(widths, (list, tuple)):
            _fail("widths", widths, f"a list of {self.depth - 1} positive integers")
        widths = tuple(widths)
        if len(widths) != self.depth - 1:
            _fail("widths", ",".join(map(str, widths)),
                  f"depth {self.depth} needs {self.depth - 1} hidden widths "
                  f"(depth counts Linear layers; one width for every hidden layer is "
                  f"width, --width on the command line)")
        for w in widths:
            _check_int("width", w, 1, MAX_WIDTH)
        object.__setattr__(self, "widths", widths)
        _check_choice("activation", self.activation, ACTIVATIONS)
        object.__setattr__(self, "init", _canonical_init(self.init))
        object.__setattr__(self, "bias_init", _canonical_init(self.bias_init, bias=True))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_float("lr", self.lr, positive=True)
        _check_float("momentum", self.momentum, positive=False)
        _check_float("weight_decay", self.weight_decay, positive=False)
        _check_int("batch_size", self.batch_size, 1, 1_000_000)
        _check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.clip_grad_norm is not None:
            _check_float("clip_grad_norm", self.clip_grad_norm, positive=True)
        if self.train_size is not None:
            _check_int("train_size", self.train_size, 1)
        if not isinstance(self.standardize, bool):
            _fail("standardize", self.standardize, "true or false")
        _check_int("log_every", self.log_every, 0)
        if not isinstance(self.log_spaced, bool):
            _fail("log_spaced", self.log_spaced, "true or false")
        _check_choice("engine", self.engine, ENGINES)
        if not isinstance(self.applied_updates, bool):
            _fail("applied_updates", self.applied_updates, "true or false")
        _check_choice("criterion", self.criterion, CRITERIA)
        _check_int("dist_every", self.dist_every, 0)
        if not isinstance(self.dist_log_spaced, bool):
            _fail("dist_log_spaced", self.dist_log_spaced, "true or false")
        if self.engine != "autograd" and (self.dist_every or self.criterion != "cross_entropy"
                                          or self.applied_updates):
            what = ("dist_every" if self.dist_every else "applied_updates"
                    if self.applied_updates else "criterion")
            _fail("engine", self.engine, f"{what}={getattr(self, what)!r} needs engine "
                  f"'autograd' (the fused engine records neither distributions nor applied "
                  f"updates, and trains with cross_entropy only)")
        for name in ("lr", "momentum", "weight_decay", "clip_grad_norm"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Feature sizes from input to output: (784, *widths, 10)."""
        return (784, *self.widths, 10)

    def to_dict(self) -> dict[str, Any]:
        # every field is a scalar but widths (a tuple of ints): no deep copy (asdict's), which
        # was 16 a run in a resumed sweep (issue 33)
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d["widths"] = list(self.widths)
        return d

    def run_id(self) -> str:
        """A short, stable hash of the resolved config: same config, same id, on any machine."""
        cached = self.__dict__.get("_run_id")  # computed once a config (it was 13 times)
        if cached is not None:
            return cached
        values = {k: v for k, v in self.to_dict().items()
                  if k not in NEW_FIELD_DEFAULTS or v != NEW_FIELD_DEFAULTS[k]}
        payload = json.dumps({"v": RECORD_VERSION, **values}, sort_keys=True)
        run_id = hashlib.sha256(payload.encode()).hexdigest()[:12]
        object.__setattr__(self, "_run_id", run_id)  # (frozen: the fields never change)
        return run_id


CONFIG_FIELDS = tuple(f.name for f in fields(RunConfig))
_FIELD_NAMES = CONFIG_FIELDS
# A grid may give ``width`` (one width for every hidden layer) instead of explicit ``widths``.
GRID_KEYS = CONFIG_FIELDS + ("width",)


def make_config(**values: Any) -> RunConfig:
    """Build a RunConfig from user-facing keys (``width`` or ``widths``), raising ConfigError.
    ``widths`` are one net's hidden widths, input side first; without ``depth`` they give it."""
    unknown = sorted(set(values) - set(GRID_KEYS))
    if unknown:
        _fail(unknown[0], values[unknown[0]], "unknown key; allowed: " + ", ".join(GRID_KEYS))
    values = {k: v for k, v in values.items() if v is not None}
    width = values.pop("width", None)
    if width is not None:
        if "widths" in values:
            raise ConfigError("width and widths are both given: use one (width W for every "
                              "hidden layer, or widths a,b,... per layer)")
        _check_int("width", width, 1, MAX_WIDTH)
        depth = values.get("depth", RunConfig.depth)
        _check_int("depth", depth, 1, MAX_DEPTH)
        values["widths"] = (width,) * (depth - 1)
    elif "widths" not in values:
        depth = values.get("depth", RunConfig.depth)
        _check_int("depth", depth, 1, MAX_DEPTH)
        values["widths"] = (128,) * (depth - 1)
    elif "depth" not in values and isinstance(values["widths"], (list, tuple)):
        values["depth"] = len(values["widths"]) + 1  # one net's hidden widths give its depth
    try:
        return RunConfig(**values)
    except TypeError as e:  # e.g. an unhashable value where a scalar belongs
        raise ConfigError(str(e).splitlines()[0]) from None


def expand_grid(grid: dict[str, Any]) -> list[RunConfig]:
    """Expand a grid (key -> value or list of values) into the cross product of RunConfigs.

    ``widths`` is a list per run, so a list of lists sweeps it; a flat list is one value.
    Order follows the keys as given, last key fastest; duplicates are dropped.
    """
    axes: dict[str, list[Any]] = {}
    for key, value in grid.items():
        if key not in GRID_KEYS:
            _fail(key, value, "unknown key; allowed: " + ", ".join(GRID_KEYS))
        is_list = isinstance(value, (list, tuple))
        if key == "widths" and is_list and not any(isinstance(v, (list, tuple)) for v in value):
            value, is_list = [value], True
        values = list(value) if is_list else [value]
        if not values:
            _fail(key, value, "an empty list: give at least one value")
        axes[key] = values
    configs: dict[str, RunConfig] = {}
    for combo in itertools.product(*axes.values()):
        config = make_config(**dict(zip(axes, combo, strict=False)))
        configs.setdefault(config.run_id(), config)
    return list(configs.values())


def expand_grids(grids: list[dict[str, Any]]) -> list[RunConfig]:
    """The runs of several grids (``expand_grid`` each), in order, without duplicates."""
    configs: dict[str, RunConfig] = {}
    for grid in grids:
        for config in expand_grid(grid):
            configs.setdefault(config.run_id(), config)
    return list(configs.values())


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file, turning syntax errors into a one-line ConfigError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: malformed TOML: not UTF-8 text") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a TOML file") from None
