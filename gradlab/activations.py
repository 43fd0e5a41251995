"""The activation registry: everything gradlab knows about each activation, in one table.

Config validation reads the names, ``build_mlp`` the modules, the recorder f′ (from z, or from
the activation's output where that is exact and cheap). Importing this module does not import
torch (the CLI's ``--help`` reads the names): each function imports it when first called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

LEAKY_SLOPE = 0.01
SATURATION = 0.05  # a unit is saturated where f'(z) < SATURATION * max f'


def _torch():
    import torch

    return torch


@dataclass(frozen=True)
class Activation:
    """One activation f and what the recorder needs to know about it.

    Attributes:
        name: the config name.
        module: makes the ``nn.Module`` (no arguments).
        derivative: f′(z) in closed form (the tests check it against autograd).
        max_derivative: max f′, which scales the saturation threshold.
        saturating: sigmoid, tanh, softsign: ``saturated_frac`` is defined.
        relu_family: relu, leaky_relu: ``dead_frac`` is defined.
        from_output: ``(a, out) -> out``: f′ as a function of the output a = f(z), written into
            out, where that is exact (then the recorder needs no copy of z).
    """

    name: str
    module: Callable
    derivative: Callable
    max_derivative: float
    saturating: bool = False
    relu_family: bool = False
    from_output: Callable | None = None


def _nn(name: str, *args) -> Callable:
    return lambda: getattr(_torch().nn, name)(*args)


def _sigmoid_prime(z):
    s = z.sigmoid()
    return s - s * s


def _gelu_prime(z):
    # exact (erf) GELU's d/dz z*Phi(z) = Phi(z) + z*phi(z), by torch's own backward kernel with
    # a unit gradient: one fused pass, 1.6 ms against 8.9 ms for the formula's erf and exp on a
    # GPT MLP's 524,288 entries (AMD EPYC, 1 thread)
    return _torch().ops.aten.gelu_backward(_torch().ones_like(z), z)


def _silu_prime(z):
    s = z.sigmoid()
    return s * (1 + z * (1 - s))


def _leaky_prime(z):
    return _torch().where(z > 0, 1.0, LEAKY_SLOPE).to(z.dtype)


def _elu_prime(z):
    return _torch().where(z > 0, _torch().ones_like(z), z.exp())


def _softsign_prime(z):
    return 1 / (1 + z.abs()) ** 2


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation(
        "sigmoid", _nn("Sigmoid"), _sigmoid_prime, 0.25, saturating=True,
        from_output=lambda a, out: _torch().addcmul(a, a, a, value=-1, out=out)),  # a - a*a
    Activation(
        "tanh", _nn("Tanh"), lambda z: 1 - z.tanh() ** 2, 1.0, saturating=True,
        from_output=lambda a, out: _torch().mul(a, a, out=out).neg_().add_(1)),
    Activation(
        "relu", _nn("ReLU"), lambda z: (z > 0).to(z.dtype), 1.0, relu_family=True,
        # a >= 0: 1 exactly where a > 0, i.e. where z > 0
        from_output=lambda a, out: _torch().clamp(a, max=1, out=out).ceil_()),
    Activation(
        "leaky_relu", _nn("LeakyReLU", LEAKY_SLOPE), _leaky_prime, 1.0, relu_family=True,
        from_output=lambda a, out: _torch().clamp(a, 0, 1, out=out).ceil_().mul_(
            1 - LEAKY_SLOPE).add_(LEAKY_SLOPE)),
    Activation(
        "elu", _nn("ELU"), _elu_prime, 1.0,
        # autograd's own ELU backward uses a + 1 for z <= 0
        from_output=lambda a, out: _torch().add(a, 1, out=out).clamp_(max=1)),
    Activation("gelu", _nn("GELU"), _gelu_prime, 1.129),  # max of Phi(z)+z*phi(z), at z = sqrt(2)
    Activation("silu", _nn("SiLU"), _silu_prime, 1.0998),  # max at z ~ 2.40
    Activation("softsign", _nn("Softsign"), _softsign_prime, 1.0, saturating=True),
)}

NAMES = tuple(ACTIVATIONS)


def get(name: str) -> Activation:
    """The registry entry of ``name``; an unknown name is a one-line ValueError listing the
    known ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation {name!r} is unknown: one of {', '.join(NAMES)}") from None
