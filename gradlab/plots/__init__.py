"""Seaborn figures of the gradient records.

Each figure is a function of the tidy frames of ``gradlab.load`` (or of ``gradlab.watch``) with
a seaborn-style signature, ``f(data, *, x=..., y=..., hue=..., ...)``, named as the figure
that ``gradlab plot`` writes:

    grad_norm_by_layer(grads)      ‖∂L/∂W‖ per layer, input to output, one panel per depth
    grad_norm_over_steps(grads)    ‖∂L/∂W‖ of each layer over training, activation × depth
    vanishing_ratio(grads)         ‖g_first‖/‖g_last‖ against depth, with 0.25^(depth−1)
    act_grad_by_layer(grads)       mean f′ per hidden layer against its activation's largest f′
    accuracy_by_epoch(epochs)      test accuracy and loss by epoch
    saturation_over_steps(grads)   saturated or dead units per hidden layer over training
    update_ratio_over_steps(grads) ‖ΔW‖/‖W‖ of each layer over training
    grad_norm_through_time(time)   a recurrent layer's ‖∂L/∂x_t‖ against t, one line per step

and for any model (a run of ``gradlab.watch`` or a framework callback), layers by name in
forward order (``gradlab.plots.model``):

    layer_profile(grads)           ‖∂L/∂W‖ and ‖ΔW‖/‖W‖ per layer, median over recorded steps
    act_grad_by_name(grads)        mean f′ of each layer whose activation is known
    metrics_over_steps(metrics)    what rec.log recorded, per metric and split
    through_time_figure(time)      each recurrent layer's gradient through time

Figure-level functions return a ``matplotlib.figure.Figure`` (made without pyplot, so nothing
is left open); ``vanishing_ratio`` is axes-level (``ax=``) and returns the Axes. A frame that
lacks a facet or hue column (depth, activation, seed, status, run_id, epoch) is drawn without
that facet. The numbers behind the figures are plain functions in ``gradlab.tables``
(``vanishing_ratios``, ``final_accuracy_table``; importable from here too).

``write_figures(results_dir)`` draws every figure of a results folder to files; the same
records give the same bytes. ``prepare``, ``figures`` and ``render`` are its steps, which the
HTML report uses too.

Modules: ``style`` (the paper style), ``frames`` (which rows and columns are drawn),
``layout`` (facets and legends), ``by_layer``, ``over_steps``, ``vanishing``, ``accuracy``,
``through_time``, ``model`` (the figures), ``catalog`` (the figures of a results folder by name),
``files`` (writing).
"""

from ..tables import (
    SIGMOID_MAX_SLOPE,
    final_accuracy,
    final_accuracy_table,
    vanishing_ratios,
    vanishing_table,
)
from .accuracy import accuracy_by_epoch
from .by_layer import act_grad_by_layer, grad_norm_by_layer
from .catalog import CAPTIONS, FIGURES, MODEL_FIGURES, Prepared, draw, figures, prepare
from .files import FORMATS, render, write_figures
from .model import act_grad_by_name, layer_profile, metrics_over_steps, through_time_figure
from .over_steps import grad_norm_over_steps, saturation_over_steps, update_ratio_over_steps
from .style import LAYER_LABEL, paper_style
from .through_time import grad_norm_through_time
from .vanishing import vanishing_figure, vanishing_ratio, vanishing_ratio_plot

__all__ = [
    "CAPTIONS",
    "FIGURES",
    "FORMATS",
    "LAYER_LABEL",
    "MODEL_FIGURES",
    "SIGMOID_MAX_SLOPE",
    "Prepared",
    "accuracy_by_epoch",
    "act_grad_by_layer",
    "act_grad_by_name",
    "draw",
    "figures",
    "final_accuracy",
    "final_accuracy_table",
    "grad_norm_by_layer",
    "grad_norm_over_steps",
    "grad_norm_through_time",
    "layer_profile",
    "metrics_over_steps",
    "paper_style",
    "prepare",
    "render",
    "saturation_over_steps",
    "through_time_figure",
    "update_ratio_over_steps",
    "vanishing_figure",
    "vanishing_ratio",
    "vanishing_ratio_plot",
    "vanishing_ratios",
    "vanishing_table",
    "write_figures",
]
