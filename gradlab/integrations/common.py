"""What the framework callbacks share: the framework's import, one watch per fit, a
framework's metric names as gradlab's (split, metric), its settings as the run's config, and
the save."""

from __future__ import annotations

import enum
import importlib
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingExtra
from ..record.saving import NAME, check_config
from ..store import StoreError, run_dir


def framework(modules: Iterable[str], extra: str, needed_by: str):
    """The first of ``modules`` that imports (e.g. ``lightning.pytorch``, then the older
    ``pytorch_lightning``); a one-line ``MissingExtra`` when none is installed. An installed
    module that fails to import for another reason raises that error."""
    for module in modules:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # the framework is there but lacks a dependency of its own: say which
    raise MissingExtra(f"{needed_by} needs the {extra} package: pip install 'gradlab[{extra}]'")


def split_metric(name: str, prefixes: Iterable[str], default: str) -> tuple[str, str]:
    """``("val", "loss")`` for ``val_loss`` or ``val/loss`` when ``val`` is one of
    ``prefixes``; ``(default, name)`` for every other name (``loss``, ``lr-SGD``)."""
    for sep in ("/", "_"):
        head, found, rest = name.partition(sep)
        if found and rest and head in prefixes:
            return head, rest
    return default, name


def is_number(value) -> bool:
    """Whether ``rec.log`` takes ``value``: a real number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def scalars(values: Mapping) -> dict:
    """The entries of ``values`` that a run's config holds: JSON scalars as they are, an enum as
    its value, a list of scalars joined by commas (``[32, 32]`` -> ``"32,32"``, as gradlab
    writes widths); other values (objects, nested dicts) are left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, (str, int, float, bool)) for v in value):
            value = ",".join(map(str, value))
        if isinstance(key, str) and key and (
                value is None or isinstance(value, (str, int, float, bool))):
            out[key] = value
    return out


class Recording:
    """One ``gradlab.watch`` per fit, for a framework callback: ``begin(model)`` at the fit's
    start, ``log`` and ``flush`` during it, ``end`` at its end (saves the run)."""

    def __init__(self, out, log_every: int, name: str | None, config: Mapping | None,
                 overwrite: bool, **watch_options):
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every={log_every!r} is invalid: a whole number >= 0")
        if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
            raise ValueError(f"name={name!r} is invalid: 1-100 letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit")
        self.out, self.log_every, self.name = os.fspath(out), log_every, name
        self.config = check_config(dict(config) if isinstance(config, Mapping) else config or {})
        self.overwrite = overwrite
        self.watch_options = watch_options
        self.rec = None  # the last fit's Watch (kept after the fit: rec.flush() frames, etc.)
        self.path: Path | None = None  # the last run saved
        self._open = False

    def begin(self, model: nn.Module) -> None:
        """Start watching ``model`` (every optimizer that steps its parameters counts)."""
        from ..record import watch

        self.abort()  # a fit that ended without its end hook (an error) left its watch open
        if (self.name is not None and not self.overwrite
                and (run_dir(self.out, self.name) / "config.json").exists()):
            # said now, not after the fit (rec.save would refuse the same)
            raise StoreError(f"a run named {self.name!r} is already in {self.out}: give another "
                             f"name, or overwrite=True to replace it")
        self.rec = watch(model, None, self.log_every, **self.watch_options)
        self.rec.__enter__()
        self._open = True

    def log(self, values: Mapping, prefixes: Iterable[str], default: str) -> None:
        """``rec.log`` the numbers of ``values``, each under the split its name gives
        (``split_metric``)."""
        if not self._open:
            return
        by_split: dict[str, dict] = {}
        for name, value in values.items():
            if is_number(value):
                split, metric = split_metric(name, prefixes, default)
                if metric != "split":  # (rec.log's own keyword)
                    by_split.setdefault(split, {})[metric] = value
        for split, metrics in by_split.items():
            self.rec.log(split=split, **metrics)

    def flush(self) -> None:
        """Move the steps recorded so far to the host (at an epoch end: numbers the epoch)."""
        if self._open:
            self.rec.flush()

    def abort(self) -> None:
        """Remove the hooks without saving (the fit failed)."""
        if self._open:
            self._open = False
            self.rec.__exit__(None, None, None)

    def end(self, save: bool, config: Mapping) -> Path | None:
        """Remove the hooks, then (where ``save``: rank 0) save the run with ``config``
        (the framework's settings) updated by the callback's own ``config``."""
        if not self._open:
            return None
        self.abort()
        if save:
            self.path = self.rec.save(self.out, name=self.name,
                                      config={**scalars(config), **self.config},
                                      overwrite=self.overwrite)
        return self.path


class Recorded:
    """What both callbacks share: a ``Recording``, and its watch (``rec``) and run folder."""

    recording: Recording

    @property
    def rec(self):
        """The ``gradlab.watch`` of the fit now running (None outside one)."""
        return self.recording.rec

    @property
    def path(self) -> Path | None:
        """The run folder saved at the end of the last fit."""
        return self.recording.path
