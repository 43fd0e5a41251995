"""The MLP: ``build_mlp`` and the activation and initialisation registries."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .activations import ACTIVATIONS, LEAKY_SLOPE, get  # noqa: F401  (ACTIVATIONS: re-exported)
from .config import parse_init


def _lecun_normal_(w: torch.Tensor) -> None:
    nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))


def _kaiming_nonlinearity(activation: str) -> str:
    return "leaky_relu" if activation == "leaky_relu" else "relu"


def init_weight_(w: torch.Tensor, spec: str, activation: str) -> None:
    """Initialise a Linear weight in place from an init spec (``config.WEIGHT_INITS``)."""
    name, arg = parse_init(spec)
    nl = _kaiming_nonlinearity(activation)
    slope = LEAKY_SLOPE if nl == "leaky_relu" else 0
    actions = {
        "default": lambda: None,  # nn.Linear's own (kaiming_uniform with a=sqrt(5))
        "xavier_uniform": lambda: nn.init.xavier_uniform_(w),
        "xavier_normal": lambda: nn.init.xavier_normal_(w),
        "kaiming_uniform": lambda: nn.init.kaiming_uniform_(w, a=slope, nonlinearity=nl),
        "kaiming_normal": lambda: nn.init.kaiming_normal_(w, a=slope, nonlinearity=nl),
        "lecun_normal": lambda: _lecun_normal_(w),
        # plain orthogonal keeps its own call (bit for bit as before GAIN existed)
        "orthogonal": lambda: nn.init.orthogonal_(w) if arg is None else nn.init.orthogonal_(
            w, gain=arg),
        "normal": lambda: nn.init.normal_(w, std=arg),
        "uniform": lambda: nn.init.uniform_(w, -arg, arg),
        # the mean-field σ_w² (gradlab.theory): Var W_ij = SW2 / fan_in
        "normal_fan_in": lambda: nn.init.normal_(w, std=math.sqrt(arg / w.shape[1])),
    }
    actions[name]()


def init_bias_(b: torch.Tensor, spec: str) -> None:
    """Initialise a Linear bias in place: ``default`` (PyTorch's), ``zeros`` or ``normal:STD``."""
    name, arg = parse_init(spec, bias=True)
    if name == "zeros":
        nn.init.zeros_(b)
    elif name == "normal":
        nn.init.normal_(b, std=arg)


def build_mlp(
    sizes: tuple[int, ...] | list[int],
    activation: str = "sigmoid",
    init: str = "default",
    bias_init: str = "default",
) -> nn.Sequential:
    """An MLP with ``len(sizes) - 1`` Linear layers, the activation after every one but the last.

    Layers are named ``fc0 … fc{depth-1}`` from the input side, activations ``act0 …``, so records
    can say which is which. Uses the global RNG, as ``nn.Linear`` does: seed before calling.

    Args:
        sizes: feature sizes from input to output, e.g. (784, 128, 256, 10) for the tutorial net.
        activation: a name from ``ACTIVATIONS``.
        init: weight init spec, e.g. ``kaiming_normal`` or ``normal:0.5``.
        bias_init: bias init spec.
    """
    act = get(activation)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    depth = len(sizes) - 1
    for i in range(depth):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            init_weight_(linear.weight, init, activation)
            init_bias_(linear.bias, bias_init)
        layers[f"fc{i}"] = linear
        if i < depth - 1:
            layers[f"act{i}"] = act.module()
    return nn.Sequential(layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The model's Linear layers in forward (input → output) order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]
