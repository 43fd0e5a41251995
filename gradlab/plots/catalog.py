"""The figures of a results folder: their names and captions, the prepared frames they are
drawn from (also the numbers of the report), and drawing them by name.

A folder of gradlab's own MLPs gets the tutorial's figures (``FIGURES``: by depth and
activation, the vanishing ratio against 0.25^(depth−1)); a folder that holds any other model
(``gradlab.watch``, a framework callback) gets figures by layer name (``MODEL_FIGURES``), and
none that assumes a depth or a sigmoid."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import pandas as pd
from matplotlib.figure import Figure

from ..config import ConfigError
from ..store import RUNS, Results, StoreError
from ..tables import final_accuracy_table, vanishing_ratios, with_setup
from .accuracy import accuracy_by_epoch
from .by_layer import act_grad_by_layer, grad_norm_by_layer
from .frames import levels
from .model import (
    act_grad_by_name,
    layer_profile,
    metrics_over_steps,
    ordered_names,
    through_time_figure,
)
from .over_steps import grad_norm_over_steps, saturation_over_steps, update_ratio_over_steps
from .vanishing import vanishing_figure

FIGURES = ("grad_norm_by_layer", "grad_norm_over_steps", "vanishing_ratio", "act_grad_by_layer",
           "accuracy_by_epoch", "saturation_over_steps")
CAPTIONS = {
    "grad_norm_by_layer": "Gradient norm by layer (first epoch)",
    "grad_norm_over_steps": "Gradient norm per layer over training",
    "vanishing_ratio": "Vanishing ratio ‖g_first‖/‖g_last‖ against depth, beside "
                       "0.25^(depth−1), σ′'s largest value multiplied over the layers",
    "act_grad_by_layer": "Mean f′ per hidden layer against its activation's largest f′ "
                         "(σ′: 0.25)",
    "accuracy_by_epoch": "Test accuracy and loss by epoch",
    "saturation_over_steps": "Saturated / dead units per layer over training",
}
MODEL_FIGURES = ("layer_profile", "grad_norm_over_steps", "update_ratio_over_steps",
                 "act_grad_by_layer", "metrics_over_steps", "grad_through_time")
MODEL_CAPTIONS = {
    "layer_profile": "Gradient norm ‖∂L/∂W‖ and update ratio ‖ΔW‖/‖W‖ per layer, input to "
                     "output",
    "grad_norm_over_steps": "Gradient norm per layer over training",
    "update_ratio_over_steps": "Update ratio ‖ΔW‖/‖W‖ per layer over training",
    "act_grad_by_layer": "Mean f′ per layer, against the largest f′ of its own activation",
    "metrics_over_steps": "Logged metrics over training",
    "grad_through_time": "Gradient through time of each recurrent layer",
}


@dataclass
class Prepared:
    """A results folder's frames, sorted deterministically, with the figures' ``hue`` column
    and the numbers that both the figures and the report show (computed once). ``kind`` is
    "mlp" (every run one of gradlab's own MLPs) or "model" (any other)."""

    grads: pd.DataFrame
    epochs: pd.DataFrame
    runs: pd.DataFrame
    hue: str
    problems: list[str]
    kind: str = "mlp"
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    time: pd.DataFrame = field(default_factory=pd.DataFrame)
    metas: dict = field(default_factory=dict)  # run_id -> its config.json

    @property
    def hue_order(self) -> list:
        """Every hue level of every run, so that a level has one colour in every figure."""
        return levels(self.runs, self.hue)

    @property
    def names(self) -> tuple[str, ...]:
        """The figures of this kind of results."""
        return FIGURES if self.kind == "mlp" else MODEL_FIGURES

    def caption(self, name: str) -> str:
        return (CAPTIONS if self.kind == "mlp" else MODEL_CAPTIONS).get(name, name)

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
    there are no runs (``where`` names the folder in the message, and is read for the runs'
    descriptions of their layers)."""
    if results.runs.empty:
        raise StoreError(f"{where} holds no runs: nothing to draw")
    grads, epochs = results.grads, results.epochs
    if not grads.empty:
        grads = sort_stable(grads, ["run_id", "step", "layer"])
    if not epochs.empty:
        epochs = sort_stable(epochs, ["run_id", "epoch", "split"])
    runs = results.runs.sort_values("run_id", kind="stable").reset_index(drop=True)
    own = "source" not in runs or bool((runs["source"].fillna("gradlab") == "gradlab").all())
    if not own:  # any other model: layers by name, each with the activation known after it
        metas = {r: run_meta(where, r) for r in runs["run_id"]}
        grads = with_layer_activation(grads.reset_index(drop=True), metas)
        return Prepared(grads, epochs.reset_index(drop=True), runs, "run_id",
                        list(results.problems), "model", sorted_frame(results.metrics),
                        sorted_frame(results.time), metas)
    grads, hue = with_setup(grads.reset_index(drop=True), runs)
    epochs, _ = with_setup(epochs.reset_index(drop=True), runs)
    runs, _ = with_setup(runs, runs)
    # each run's config.json as load read it, so that the report's provenance does not read
    # every run again (2.7 s of the report at 5,000 runs)
    metas = {run.run_id: run.meta for run in results.verified or () if run.meta}
    return Prepared(grads, epochs, runs, hue, list(results.problems), metas=metas)


def sort_stable(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``frame.sort_values(keys, kind="stable")``, or ``frame`` itself where it is already in
    that order (as ``load`` reads gradlab's records: runs by id, rows by step and layer), so
    that the largest frame is not copied (one copy of the grads frame less at peak)."""
    if all(k in frame for k in keys) and not frame[keys].isna().any().any():
        if pd.MultiIndex.from_frame(frame[keys]).is_monotonic_increasing:
            return frame
    return frame.sort_values(keys, kind="stable")


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("run_id", "step", "layer", "t", "split", "metric") if c in frame]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True) if keys else frame


def run_meta(results_dir, run_id: str) -> dict:
    """A run's ``config.json`` (in ``runs/<run_id>/``, or the folder itself for one run's
    folder); {} where it does not read back as that run's."""
    try:
        base = os.fspath(results_dir)
    except TypeError:
        return {}
    for path in (os.path.join(base, RUNS, run_id, "config.json"),
                 os.path.join(base, "config.json")):
        try:
            if not os.path.isfile(path) or os.path.getsize(path) > MAX_META_BYTES:
                continue
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(meta, dict) and meta.get("run_id") == run_id:
            return meta
    return {}


MAX_META_BYTES = 16 << 20


def with_layer_activation(grads: pd.DataFrame, metas: dict) -> pd.DataFrame:
    """``grads`` with layer names in forward order and ``layer_activation``: the activation
    after each layer as its run describes it (watched runs), or the run's own activation for
    a hidden layer of gradlab's MLP; None where not known."""
    if grads.empty:
        return grads
    known = {}
    for run_id, meta in metas.items():
        for layer in (meta.get("watched") or {}).get("layers") or []:
            if isinstance(layer, dict):
                known[(run_id, layer.get("layer"))] = layer.get("activation")
    acts = [known.get((r, layer)) for r, layer in zip(grads["run_id"], grads["layer"])]
    if "activation" in grads and "depth" in grads:  # a gradlab MLP among them
        own = grads["activation"].where(grads["layer"] < grads["depth"] - 1)
        acts = [a if a is not None else (o if isinstance(o, str) else None)
                for a, o in zip(acts, own)]
    return ordered_names(grads.assign(layer_activation=acts))


def draw(name: str, data: Prepared) -> Figure:
    """Draw figure ``name`` (one of ``data.names``) from prepared frames."""
    if data.kind == "model":
        return draw_model(name, data)
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


def draw_model(name: str, data: Prepared) -> Figure:
    """A figure of ``MODEL_FIGURES``: layers by name, one row of panels (or colour) per run."""
    several = data.runs["run_id"].nunique() > 1
    row = "run_id" if several else None
    if name == "layer_profile":
        return layer_profile(data.grads)
    if name == "grad_norm_over_steps":
        return grad_norm_over_steps(data.grads, hue="layer_name", row=row, col=None)
    if name == "update_ratio_over_steps":
        return update_ratio_over_steps(data.grads, hue="layer_name", row=row, col=None)
    if name == "act_grad_by_layer":
        return act_grad_by_name(data.grads)
    if name == "metrics_over_steps":
        return metrics_over_steps(data.metrics)
    if name == "grad_through_time":
        return through_time_figure(data.time)
    raise ConfigError(f"figure {name!r} is unknown: one of {', '.join(MODEL_FIGURES)}")


def sources(name: str, data: Prepared) -> pd.DataFrame:
    """The frame figure ``name`` is drawn from (empty: it is skipped)."""
    if name == "accuracy_by_epoch":
        return data.epochs
    if name == "metrics_over_steps":
        return data.metrics
    if name == "grad_through_time":
        return data.time
    return data.grads


def figures(data: Prepared, only: Sequence[str] | None = None) -> Iterator[tuple[str, Figure]]:
    """Draw the figures of prepared results (or ``only`` those of its kind), skipping with a
    warning any whose records are missing (e.g. runs recorded with --log-every 0); a model
    without recurrent layers or logged metrics simply has no figure of them."""
    names = check_names(only)
    for name in (n for n in names if only and n not in data.names):
        kind = "gradlab's own MLPs" if data.kind == "model" else "runs of other models"
        warnings.warn(f"figure {name} skipped: it is drawn for {kind} only", stacklevel=2)
    for name in (n for n in data.names if n in names):
        if sources(name, data).empty:
            if name not in ("metrics_over_steps", "grad_through_time"):
                warnings.warn(f"figure {name} skipped: no records for it", stacklevel=2)
            continue
        try:
            yield name, draw(name, data)
        except ValueError as e:
            warnings.warn(f"figure {name} skipped: {e}", stacklevel=2)


ALL_FIGURES = tuple(dict.fromkeys((*FIGURES, *MODEL_FIGURES)))


def check_names(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(ALL_FIGURES)
    unknown = [n for n in only if n not in ALL_FIGURES]
    if unknown:
        raise ConfigError(f"figure {unknown[0]!r} is unknown: one of {', '.join(ALL_FIGURES)}")
    return [n for n in ALL_FIGURES if n in only]
