"""Each activation's kernels for the stacked engine: autograd's own aten kernels written into a
given buffer (so the engine's bits match autograd's), and the numba code of each activation
whose f′ is a function of its output.

aten's kernels are a private API: each call falls back to public operations, with the same
values, where torch lacks the kernel (``tests/test_compat.py`` checks both against autograd).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import activations
from ..activations import LEAKY_SLOPE, Activation

_aten = getattr(torch.ops, "aten", None)


def _aten_op(name: str, overload: str):
    packet = getattr(_aten, name, None) if _aten is not None else None
    return getattr(packet, overload, None) if packet is not None else None


def backward_into(name: str, *args, out: torch.Tensor, fallback) -> torch.Tensor:
    """An activation's backward kernel ``aten.<name>.grad_input(*args)`` written into ``out``
    (the kernel autograd itself runs, so the bits match autograd's); ``fallback()`` computes the
    same value with public ops where the kernel is missing."""
    op = _aten_op(name, "grad_input")
    if op is not None:
        return op(*args, grad_input=out)
    return out.copy_(fallback())


def forward_into(name: str, z: torch.Tensor, *args, out: torch.Tensor, fallback) -> torch.Tensor:
    """The activation ``aten.<name>.out(z, *args)`` written into ``out`` (no new tensor);
    ``fallback()`` where the kernel is missing."""
    op = _aten_op(name, "out")
    if op is not None:
        return op(z, *args, out=out)
    return out.copy_(fallback())


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelActivation(Activation):
    """A registry entry (``gradlab.activations.Activation``) with what the stacked engine adds.

    Attributes:
        backward: ``(g, saved, out) -> out``: dL/dz from dL/da = g, with autograd's own kernel;
            ``saved`` is the output a where ``from_output`` is set, else z.
        forward_into: ``(z, out) -> out``: f(z) written into out (the ``from_output`` ones).
        code: the numba kernels' code for it (the ``from_output`` ones), else None.
    """

    backward: Callable
    forward_into: Callable | None = None
    code: int | None = None

    @property
    def saves(self) -> str:
        """What the backward pass reads: ``"output"`` (a) or ``"input"`` (z)."""
        return "output" if self.from_output is not None else "input"


def _aten_backward(name: str, *args, fallback) -> Callable:
    """An aten backward kernel ``name(g, <args>, saved)`` or ``name(g, saved, <args>)``."""
    def backward(g, saved, out):
        call = (g, saved, *args) if name != "elu_backward" else (g, *args, saved)
        return backward_into(name, *call, out=out, fallback=lambda: fallback(g, saved))
    return backward


def _prime(name: str) -> Callable:
    return activations.ACTIVATIONS[name].derivative


def _softsign_backward(g, z, out):
    return torch.mul(g, _prime("softsign")(z), out=out)


def _entry(name: str, backward: Callable, **kernels) -> KernelActivation:
    """The registry entry of ``name`` with the engine's kernels added."""
    core = activations.ACTIVATIONS[name]
    fields = {f.name: getattr(core, f.name) for f in dataclasses.fields(Activation)}
    return KernelActivation(**fields, backward=backward, **kernels)


ACTIVATIONS: dict[str, KernelActivation] = {a.name: a for a in (
    _entry("sigmoid", code=0,
           backward=_aten_backward("sigmoid_backward", fallback=lambda g, a: g * (a - a * a)),
           forward_into=lambda z, out: torch.sigmoid(z, out=out)),
    _entry("tanh", code=1,
           backward=_aten_backward("tanh_backward", fallback=lambda g, a: g * (1 - a * a)),
           forward_into=lambda z, out: torch.tanh(z, out=out)),
    _entry("relu", code=2,
           backward=_aten_backward("threshold_backward", 0, fallback=lambda g, a: g * (a > 0)),
           forward_into=lambda z, out: forward_into(
               "relu", z, out=out, fallback=lambda: z.clamp(min=0))),
    _entry("leaky_relu", code=3,
           backward=_aten_backward("leaky_relu_backward", LEAKY_SLOPE, True,
                                   fallback=lambda g, a: g * _prime("leaky_relu")(a)),
           forward_into=lambda z, out: forward_into(
               "leaky_relu", z, LEAKY_SLOPE, out=out,
               fallback=lambda: torch.nn.functional.leaky_relu(z, LEAKY_SLOPE))),
    _entry("elu", code=4,
           backward=_aten_backward("elu_backward", 1.0, 1, 1, True,
                                   fallback=lambda g, a: g * (a + 1).clamp(max=1)),
           forward_into=lambda z, out: forward_into(
               "elu", z, 1.0, 1, 1, out=out, fallback=lambda: torch.nn.functional.elu(z))),
    _entry("gelu", _aten_backward("gelu_backward", fallback=lambda g, z: g * _prime("gelu")(z))),
    _entry("silu", _aten_backward("silu_backward", fallback=lambda g, z: g * _prime("silu")(z))),
    _entry("softsign", _softsign_backward),
)}


def get(name: str) -> KernelActivation:
    """The engine's entry of ``name``; an unknown name is ``gradlab.activations.get``'s error."""
    return ACTIVATIONS[activations.get(name).name]
