"""The activation registry: everything gradlab knows about each activation, in one table.

Config validation reads the names, ``build_mlp`` the modules, the recorder f′ (from z, or from
the activation's output where that is exact and cheap), the engines the forward and backward
kernels and the numba code. Importing this module does not import torch (the CLI's ``--help``
reads the names): each function imports it when first called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

LEAKY_SLOPE = 0.01
SATURATION = 0.05  # a unit is saturated where f'(z) < SATURATION * max f'


def _torch():
    import torch

    return torch


def _compat():
    from . import compat

    return compat


@dataclass(frozen=True)
class Activation:
    """One activation f and what the recorder and the engines need to know about it.

    Attributes:
        name: the config name.
        module: makes the ``nn.Module`` (no arguments).
        derivative: f′(z) in closed form (the tests check it against autograd).
        max_derivative: max f′, which scales the saturation threshold.
        backward: ``(g, saved, out) -> out``: dL/dz from dL/da = g, with autograd's own kernel;
            ``saved`` is the output a where ``from_output`` is set, else z.
        saturating: sigmoid, tanh, softsign: ``saturated_frac`` is defined.
        relu_family: relu, leaky_relu: ``dead_frac`` is defined.
        from_output: ``(a, out) -> out``: f′ as a function of the output a = f(z), written into
            out, where that is exact (then backward reads a, and the recorder needs no copy of z).
        forward_into: ``(z, out) -> out``: f(z) written into out (the ``from_output`` ones).
        code: the numba kernels' code for it (the ``from_output`` ones), else None.
    """

    name: str
    module: Callable
    derivative: Callable
    max_derivative: float
    backward: Callable
    saturating: bool = False
    relu_family: bool = False
    from_output: Callable | None = None
    forward_into: Callable | None = None
    code: int | None = None

    @property
    def saves(self) -> str:
        """What the backward pass reads: ``"output"`` (a) or ``"input"`` (z)."""
        return "output" if self.from_output is not None else "input"


def _nn(name: str, *args) -> Callable:
    return lambda: getattr(_torch().nn, name)(*args)


def _kernel(name: str, *args, fallback) -> Callable:
    """An aten backward kernel ``name(g, <args>, saved)`` or ``name(g, saved, <args>)``."""
    def backward(g, saved, out):
        call = (g, saved, *args) if name != "elu_backward" else (g, *args, saved)
        return _compat().backward_into(name, *call, out=out,
                                       fallback=lambda: fallback(g, saved))
    return backward


def _sigmoid_prime(z):
    s = z.sigmoid()
    return s - s * s


def _gelu_prime(z):
    # exact (erf) GELU: d/dz z*Phi(z) = Phi(z) + z*phi(z)
    return 0.5 * (1 + (z / math.sqrt(2)).erf()) + z * (-0.5 * z * z).exp() / math.sqrt(
        2 * math.pi)


def _silu_prime(z):
    s = z.sigmoid()
    return s * (1 + z * (1 - s))


def _leaky_prime(z):
    return _torch().where(z > 0, 1.0, LEAKY_SLOPE).to(z.dtype)


def _elu_prime(z):
    return _torch().where(z > 0, _torch().ones_like(z), z.exp())


def _softsign_prime(z):
    return 1 / (1 + z.abs()) ** 2


def _softsign_backward(g, z, out):
    return _torch().mul(g, _softsign_prime(z), out=out)


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation(
        "sigmoid", _nn("Sigmoid"), _sigmoid_prime, 0.25, saturating=True, code=0,
        backward=_kernel("sigmoid_backward", fallback=lambda g, a: g * (a - a * a)),
        from_output=lambda a, out: _torch().addcmul(a, a, a, value=-1, out=out),  # a - a*a
        forward_into=lambda z, out: _torch().sigmoid(z, out=out)),
    Activation(
        "tanh", _nn("Tanh"), lambda z: 1 - z.tanh() ** 2, 1.0, saturating=True, code=1,
        backward=_kernel("tanh_backward", fallback=lambda g, a: g * (1 - a * a)),
        from_output=lambda a, out: _torch().mul(a, a, out=out).neg_().add_(1),
        forward_into=lambda z, out: _torch().tanh(z, out=out)),
    Activation(
        "relu", _nn("ReLU"), lambda z: (z > 0).to(z.dtype), 1.0, relu_family=True, code=2,
        backward=_kernel("threshold_backward", 0, fallback=lambda g, a: g * (a > 0)),
        # a >= 0: 1 exactly where a > 0, i.e. where z > 0
        from_output=lambda a, out: _torch().clamp(a, max=1, out=out).ceil_(),
        forward_into=lambda z, out: _compat().forward_into(
            "relu", z, out=out, fallback=lambda: z.clamp(min=0))),
    Activation(
        "leaky_relu", _nn("LeakyReLU", LEAKY_SLOPE), _leaky_prime, 1.0, relu_family=True,
        code=3,
        backward=_kernel("leaky_relu_backward", LEAKY_SLOPE, True,
                         fallback=lambda g, a: g * _leaky_prime(a)),
        from_output=lambda a, out: _torch().clamp(a, 0, 1, out=out).ceil_().mul_(
            1 - LEAKY_SLOPE).add_(LEAKY_SLOPE),
        forward_into=lambda z, out: _compat().forward_into(
            "leaky_relu", z, LEAKY_SLOPE, out=out,
            fallback=lambda: _torch().nn.functional.leaky_relu(z, LEAKY_SLOPE))),
    Activation(
        "elu", _nn("ELU"), _elu_prime, 1.0, code=4,
        backward=_kernel("elu_backward", 1.0, 1, 1, True,
                         fallback=lambda g, a: g * (a + 1).clamp(max=1)),
        # autograd's own ELU backward uses a + 1 for z <= 0
        from_output=lambda a, out: _torch().add(a, 1, out=out).clamp_(max=1),
        forward_into=lambda z, out: _compat().forward_into(
            "elu", z, 1.0, 1, 1, out=out, fallback=lambda: _torch().nn.functional.elu(z))),
    Activation(
        "gelu", _nn("GELU"), _gelu_prime, 1.129,  # max of Phi(z)+z*phi(z), at z = sqrt(2)
        backward=_kernel("gelu_backward", fallback=lambda g, z: g * _gelu_prime(z))),
    Activation(
        "silu", _nn("SiLU"), _silu_prime, 1.0998,  # max at z ~ 2.40
        backward=_kernel("silu_backward", fallback=lambda g, z: g * _silu_prime(z))),
    Activation(
        "softsign", _nn("Softsign"), _softsign_prime, 1.0, saturating=True,
        backward=_softsign_backward),
)}

NAMES = tuple(ACTIVATIONS)


def get(name: str) -> Activation:
    """The registry entry of ``name``; an unknown name is a one-line ValueError listing the
    known ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation {name!r} is unknown: one of {', '.join(NAMES)}") from None
