"""Which modules of a model a recorder watches, their names, and the activation after each.

A recorded layer is a module with weights whose output has a unit axis: ``nn.Linear`` (units =
output features, the last axis; every leading axis counts as examples), ``nn.Conv1d`` /
``nn.Conv2d`` and ``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d`` (units = output channels, the
axis before the positions; the batch, if any, and the positions count as examples), and the
recurrent ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (units = hidden size × directions, or the
projection size where set: the features of the output sequence, whose every time step and
example counts as an example).

A recurrent module is one layer with several weight matrices (every ``weight_*`` of every
direction and stack level) and several biases: its weight and bias norms are taken over all of
them together (``joint``). Its output is a tuple ``(output, h)`` or ``(output, (h, c))``;
``output_tensor`` gives the tensor whose gradient is its dL/dz, the output sequence (a
``PackedSequence``'s ``data``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..activations import ACTIVATIONS, Activation, get
from .norms import scaled_norm

# the unit axis of each recordable type's output, counted from the end (so that it holds for
# a convolution's unbatched input too)
UNIT_AXIS: dict[type, int] = {nn.Linear: -1, nn.Conv1d: -2, nn.Conv2d: -3,
                              nn.ConvTranspose1d: -2, nn.ConvTranspose2d: -3,
                              nn.RNN: -1, nn.LSTM: -1, nn.GRU: -1}
TYPE_NAMES = ", ".join(f"nn.{t.__name__}" for t in UNIT_AXIS)
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def unit_axis(module: nn.Module) -> int:
    return next(axis for kind, axis in UNIT_AXIS.items() if isinstance(module, kind))


def units(module: nn.Module) -> int:
    """The number of units (output features or channels) of a recorded module."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, RECURRENT):
        directions = 2 if module.bidirectional else 1
        return (getattr(module, "proj_size", 0) or module.hidden_size) * directions
    return module.out_channels


def output_tensor(output) -> torch.Tensor:
    """The tensor of a recorded module's output whose gradient is its dL/dz: the output itself,
    or a recurrent module's output sequence (``(output, h)``; a ``PackedSequence``: its data)."""
    if isinstance(output, torch.Tensor):
        return output
    sequence = output[0]
    return sequence.data if isinstance(sequence, PackedSequence) else sequence


def joint(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """What one norm of a layer's tensors is taken of: its one tensor, or for several (a
    recurrent layer's matrices; None: left out) their joint 2-norm, the square root of the sum
    of their squared norms, as a 0-d tensor (its own norm, its absolute value, is that norm).
    Each norm accumulates in float64 (MPS, without float64: scaled), so nothing underflows."""
    if len(tensors) == 1:
        return tensors[0]
    real = [t for t in tensors if t is not None]
    if not real:
        return None
    # (no_grad only here: entering it costs 5 µs, 45 µs a recorded step of the tutorial net
    # were every layer's call to enter it; gradients of backward(create_graph=True) need it)
    with torch.no_grad():
        if real[0].device.type == "mps":
            return scaled_norm(torch.stack([scaled_norm(t) for t in real]))
        return torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t, dtype=torch.float64) for t in real]))


def select(model: nn.Module, modules=None) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs to record, in registration order.

    Args:
        modules: None: every ``nn.Linear``; a type or tuple of types (among ``UNIT_AXIS``, or
            subclasses); or a predicate ``fn(name) -> bool`` choosing among the modules of
            those types by qualified name.
    """
    if modules is None:
        modules = nn.Linear
    if isinstance(modules, type):
        modules = (modules,)
    if isinstance(modules, tuple):
        bad = [t for t in modules
               if not (isinstance(t, type) and any(issubclass(t, k) for k in UNIT_AXIS))]
        if bad:
            raise ValueError(f"modules={bad[0]!r} cannot be recorded: give types among "
                             f"{TYPE_NAMES} (or subclasses), or a predicate on module names")
        chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, modules)]
    elif callable(modules):
        chosen = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, tuple(UNIT_AXIS)) and modules(n)]
    else:
        raise ValueError(f"modules={modules!r} is invalid: give types among {TYPE_NAMES}, or a "
                         f"predicate on module names")
    if not chosen:
        raise ValueError(f"no module to record in {type(model).__name__}: it has none of the "
                         f"chosen kinds ({TYPE_NAMES} can be recorded)")
    return chosen


def _same_module(module: nn.Module, reference: nn.Module) -> bool:
    """Whether ``module`` computes the registry's activation (in place or not)."""
    def settings(m: nn.Module) -> str:
        return m.extra_repr().replace("inplace=True", "").strip(", ")

    return type(module) is type(reference) and settings(module) == settings(reference)


def activation_of(module: nn.Module) -> str | None:
    """The registry name of an activation module, or None where it is not one of them."""
    return next((name for name, act in ACTIVATIONS.items()
                 if _same_module(module, act.module())), None)


def found_activations(model: nn.Module, names: list[str]) -> dict[str, str | None]:
    """Per recorded module name: the activation that consumes its output where the model says
    so (the next module of the ``nn.Sequential`` that holds it), else None (not known)."""
    found: dict[str, str | None] = dict.fromkeys(names)
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (child_name, _), (_, after) in zip(children, children[1:]):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in found:
                found[name] = activation_of(after)
    return found


Spec = str | Mapping[str, str | None] | None


def layer_activations(model: nn.Module, names: list[str],
                      activation: Spec) -> list[Activation | None]:
    """The activation after each recorded module (None: not known, its f' columns stay empty).

    Args:
        activation: None: found from the model (``found_activations``); a mapping from module
            names to activation names (None: no activation), the others found from the model;
            a name: that activation after every module (the recorder leaves the output layer,
            the one first called last in the forward pass, out).
    """
    if isinstance(activation, str):
        return [get(activation)] * len(names)
    found = found_activations(model, names)
    if activation is not None:
        if not isinstance(activation, Mapping):
            raise ValueError(f"activation={activation!r} is invalid: give an activation name, "
                             f"a mapping from module names to names, or None")
        unknown = [k for k in activation if k not in found]
        if unknown:
            raise ValueError(f"activation given for {unknown[0]!r}, which is not a recorded "
                             f"module: one of {', '.join(names)}")
        found.update(activation)
    return [None if name is None else get(name) for name in found.values()]



def parameters_of(module: nn.Module) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """A recorded module's weights and biases: a recurrent module's every ``weight_*`` and
    ``bias_*`` (in its own order), else its ``weight`` and its ``bias`` (where it has one)."""
    if isinstance(module, RECURRENT):
        named = list(module.named_parameters(recurse=False))
        return ([p for n, p in named if n.startswith("weight")],
                [p for n, p in named if n.startswith("bias")])
    bias = getattr(module, "bias", None)
    return [module.weight], [bias] if isinstance(bias, torch.Tensor) else []


@dataclass(eq=False)
class Layer:
    """One recorded module: its name, its parameters and the activation after it.

    ``weights`` / ``biases``: every weight matrix and bias (several for a recurrent module, whose
    norms are taken over all of them: ``joint``); ``values``: the weights without autograd
    (aliases). ``weight``, ``bias`` and ``value``: the first of each (None: no bias) - the only
    one but for a recurrent module, where each stands for all of them only in what they share
    (device, dtype, when their gradients are made), never in a norm.
    """

    name: str
    module: nn.Module
    activation: Activation | None

    def __post_init__(self):
        self.weights, self.biases = parameters_of(self.module)
        self.weight: nn.Parameter = self.weights[0]
        self.bias: torch.Tensor | None = self.biases[0] if self.biases else None
        self.values = [w.detach() for w in self.weights]
        self.value = self.values[0]
        self.axis = unit_axis(self.module)
        self.units = units(self.module)


def recorded_layers(model: nn.Module, modules=None, activation: Spec = None) -> list[Layer]:
    """The layers to record (``select``) with the activation after each
    (``layer_activations``)."""
    named = select(model, modules)
    names = [name for name, _ in named]
    acts = layer_activations(model, names, activation)
    return [Layer(name, module, act) for (name, module), act in zip(named, acts, strict=True)]


def is_plain_mlp(model: nn.Module, layers: list[Layer], activation) -> bool:
    """Whether ``model`` is ``Linear, act, Linear, act, …, Linear`` with ``act`` the named
    activation, so that each Linear after the first receives the previous activation's output."""
    if not isinstance(model, nn.Sequential) or not isinstance(activation, str):
        return False
    act_type = type(get(activation).module())
    children = list(model.children())
    expected = [layers[i // 2].module if i % 2 == 0 else None
                for i in range(2 * len(layers) - 1)]
    return len(children) == len(expected) and all(
        child is want if want is not None else type(child) is act_type
        for child, want in zip(children, expected, strict=True))
