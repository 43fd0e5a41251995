"""The MLP: ``build_mlp`` and the activation and initialisation registries."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import parse_init


@dataclass(frozen=True)
class Activation:
    """An activation with what the recorder needs to know about it.

    ``derivative`` maps pre-activations z to f'(z) in closed form; the tests check it against
    autograd. ``max_derivative`` scales the saturation threshold (f' < 0.05 * max f').
    """

    module: Callable[[], nn.Module]
    derivative: Callable[[torch.Tensor], torch.Tensor]
    max_derivative: float
    saturating: bool = False  # sigmoid, tanh, softsign: saturated_frac is defined
    relu_family: bool = False  # relu, leaky_relu: dead_frac is defined


def _sigmoid_prime(z):
    s = torch.sigmoid(z)
    return s - s * s


def _gelu_prime(z):
    # exact (erf) GELU: d/dz z*Phi(z) = Phi(z) + z*phi(z)
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(
        2 * math.pi
    )


def _silu_prime(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


LEAKY_SLOPE = 0.01

ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(nn.Sigmoid, _sigmoid_prime, 0.25, saturating=True),
    "tanh": Activation(nn.Tanh, lambda z: 1 - torch.tanh(z) ** 2, 1.0, saturating=True),
    "relu": Activation(nn.ReLU, lambda z: (z > 0).to(z.dtype), 1.0, relu_family=True),
    "leaky_relu": Activation(
        lambda: nn.LeakyReLU(LEAKY_SLOPE),
        lambda z: torch.where(z > 0, 1.0, LEAKY_SLOPE).to(z.dtype),
        1.0,
        relu_family=True,
    ),
    "elu": Activation(nn.ELU, lambda z: torch.where(z > 0, torch.ones_like(z), torch.exp(z)), 1.0),
    "gelu": Activation(nn.GELU, _gelu_prime, 1.129),  # max of Phi(z)+z*phi(z), at z = sqrt(2)
    "silu": Activation(nn.SiLU, _silu_prime, 1.0998),  # max at z ~ 2.40
    "softsign": Activation(nn.Softsign, lambda z: 1 / (1 + z.abs()) ** 2, 1.0, saturating=True),
}


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
        "orthogonal": lambda: nn.init.orthogonal_(w),
        "normal": lambda: nn.init.normal_(w, std=arg),
        "uniform": lambda: nn.init.uniform_(w, -arg, arg),
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
    act = ACTIVATIONS[activation]
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
