"""The figures of a results folder: their names and captions, the prepared frames they are
drawn from (also the numbers of the report), and drawing them by name."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import pandas as pd
from matplotlib.figure import Figure

from ..config import ConfigError
from ..store import Results, StoreError
from ..tables import final_accuracy_table, vanishing_ratios, with_setup
from .accuracy import accuracy_by_epoch
from .by_layer import act_grad_by_layer, grad_norm_by_layer
from .frames import levels
from .over_steps import grad_norm_over_steps, saturation_over_steps
from .vanishing import vanishing_figure

FIGURES = ("grad_norm_by_layer", "grad_norm_over_steps", "vanishing_ratio", "act_grad_by_layer",
           "accuracy_by_epoch", "saturation_over_steps")
CAPTIONS = {
    "grad_norm_by_layer": "Gradient norm by layer (first epoch)",
    "grad_norm_over_steps": "Gradient norm per layer over training",
    "vanishing_ratio": "Vanishing ratio ‖g_first‖/‖g_last‖ against depth, beside "
                       "0.25^(depth−1), σ′'s largest value multiplied over the layers",
    "act_grad_by_layer": "Mean f′ per layer against σ′'s largest value, 0.25",
    "accuracy_by_epoch": "Test accuracy and loss by epoch",
    "saturation_over_steps": "Saturated / dead units per layer over training",
}


@dataclass
class Prepared:
    """A results folder's frames, sorted deterministically, with the figures' ``hue`` column
    and the numbers that both the figures and the report show (computed once)."""

    grads: pd.DataFrame
    epochs: pd.DataFrame
    runs: pd.DataFrame
    hue: str
    problems: list[str]

    @property
    def hue_order(self) -> list:
        """Every hue level of every run, so that a level has one colour in every figure."""
        return levels(self.runs, self.hue)

    @cached_property
    def ratios(self) -> pd.DataFrame:
        return vanishing_ratios(self.grads) if not self.grads.empty else pd.DataFrame()

    @cached_property
    def accuracy(self) -> pd.DataFrame:
        if self.epochs.empty:
            return pd.DataFrame()
        return final_accuracy_table(self.epochs, self.runs)


def prepare(results: Results, where: str | os.PathLike = "this results folder") -> Prepared:
    """Sort the frames of ``gradlab.load`` and add the hue column; raises StoreError when
    there are no runs (``where`` names the folder in the message)."""
    if results.runs.empty:
        raise StoreError(f"{where} holds no runs: nothing to draw")
    grads, epochs = results.grads, results.epochs
    if not grads.empty:
        grads = grads.sort_values(["run_id", "step", "layer"], kind="stable")
    if not epochs.empty:
        epochs = epochs.sort_values(["run_id", "epoch", "split"], kind="stable")
    runs = results.runs.sort_values("run_id", kind="stable").reset_index(drop=True)
    grads, hue = with_setup(grads.reset_index(drop=True), runs)
    epochs, _ = with_setup(epochs.reset_index(drop=True), runs)
    runs, _ = with_setup(runs, runs)
    return Prepared(grads, epochs, runs, hue, list(results.problems))


def draw(name: str, data: Prepared) -> Figure:
    """Draw figure ``name`` (one of ``FIGURES``) from prepared frames."""
    hue, order = data.hue, data.hue_order
    if name == "grad_norm_by_layer":
        return grad_norm_by_layer(data.grads, hue=hue, hue_order=order)
    if name == "grad_norm_over_steps":
        return grad_norm_over_steps(data.grads, row=hue)
    if name == "vanishing_ratio":
        return vanishing_figure(data.ratios, hue=hue, hue_order=order)
    if name == "act_grad_by_layer":
        return act_grad_by_layer(data.grads, hue=hue, hue_order=order)
    if name == "accuracy_by_epoch":
        return accuracy_by_epoch(data.epochs, hue=hue, hue_order=order, runs=data.runs)
    if name == "saturation_over_steps":
        return saturation_over_steps(data.grads, row=hue)
    raise ConfigError(f"figure {name!r} is unknown: one of {', '.join(FIGURES)}")


def figures(data: Prepared, only: Sequence[str] | None = None) -> Iterator[tuple[str, Figure]]:
    """Draw the figures of prepared results (or ``only`` those), skipping with a warning any
    whose records are missing (e.g. runs recorded with --log-every 0)."""
    for name in check_names(only):
        source = data.epochs if name == "accuracy_by_epoch" else data.grads
        if source.empty:
            warnings.warn(f"figure {name} skipped: no records for it", stacklevel=2)
            continue
        try:
            yield name, draw(name, data)
        except ValueError as e:
            warnings.warn(f"figure {name} skipped: {e}", stacklevel=2)


def check_names(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(FIGURES)
    unknown = [n for n in only if n not in FIGURES]
    if unknown:
        raise ConfigError(f"figure {unknown[0]!r} is unknown: one of {', '.join(FIGURES)}")
    return [n for n in FIGURES if n in only]
