"""A recorded layer's forward hook inside ``torch.compile``: no graph break, no recompile.

Dynamo traces a compiled model's module hooks into its graph. The eager hook's work - f'
statistics by a numba kernel, a dL/dz tensor hook that appends to a Python list, the layer
order - is Python state that dynamo cannot carry through a graph ("HOP: Unsafe side effect"):
each recorded layer broke the graph. Inside a compiled region the hook does only what a graph
can hold:

* it keeps each call's z (a graph output) in ``Traced.calls``, a dict that is empty whenever a
  forward begins (so its guard never fails); its f' statistics are taken eagerly, by the same
  code as an eager call's, as the backward pass that used it ends (``take``);
* it passes z through ``Tap``, an identity whose backward gives the layer's *sink* (a 0-d leaf
  tensor) the sum of squares of dL/dz, accumulated in float64 inside the compiled backward.
  Autograd adds a pass's calls into ``sink.grad``, the square of the norm of their dL/dz taken
  together, as the eager recorder takes it.

So a recorded step compiles once (its hooks differ from an unrecorded step's: one more graph,
at the first recorded step) and never again. What differs from eager: a forward with grad
enabled that no backward pass uses (an evaluation between a forward and its backward) counts
with the next pass through the same layers.
"""

from __future__ import annotations

import torch

from .layers import output_tensor


class Tap(torch.autograd.Function):
    """A copy of ``z`` (a view would lose this backward where it is the graph's output, and an
    in-place activation may overwrite it while z stays as it was); its backward gives ``sink``
    the sum of squares of dL/dz (float64)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        ctx.dtype = sink.dtype
        return z.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.to(ctx.dtype).square().sum()


class Traced:
    """The compiled hooks' calls and sinks of one recorder (see the module docstring)."""

    def __init__(self, layers, copy_z: bool, needs_inputs: bool):
        device = layers[0].value.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.sinks = [torch.zeros((), dtype=dtype, device=device, requires_grad=True)
                      for _ in layers]
        self.calls: dict[int, list] = {}  # layer -> its calls' (inputs, z) since the last take
        self.copy_z = copy_z  # an in-place activation would overwrite z
        self.needs_inputs = needs_inputs  # (ChunkedStats reads the layer's input)

    def forward(self, index: int, inputs: tuple, output):
        """The hook's work in a compiled region: returns the output with z tapped (or None)."""
        z = output_tensor(output)
        tap = z.requires_grad  # (else: no dL/dz, z kept as it is)
        kept = z.detach().clone() if self.copy_z and not tap else z.detach()
        self.calls.setdefault(index, []).append(
            (tuple(t.detach() for t in inputs) if self.needs_inputs else (), kept))
        if not tap:
            return None
        tapped = Tap.apply(z, self.sinks[index])
        if isinstance(output, torch.Tensor):
            return tapped
        if isinstance(output, tuple) and output[0] is z:  # a recurrent (output, h)
            return (tapped, *output[1:])
        return None  # (a PackedSequence: not tapped, its dL/dz stays empty)

    def reset(self) -> None:
        self.calls.clear()
        for sink in self.sinks:
            sink.grad = None

    def take(self, stats, used_only: bool) -> list[tuple]:
        """The calls since the last take, as the recorder's items ``(layer, dL/dz, call)``
        (dL/dz: a 0-d tensor whose norm is the pass's, on the layer's first item); their f'
        statistics taken now. ``used_only``: only layers this backward pass reached."""
        calls = dict(self.calls)
        self.calls.clear()  # (the same dict: the compiled graph writes into this one)
        items = []
        for index, made in calls.items():
            sink = self.sinks[index]
            squares, sink.grad = sink.grad, None
            if used_only and squares is None:
                continue
            root = None if squares is None else squares.sqrt().float()
            for k, (inputs, z) in enumerate(made):
                items.append((index, root if k == 0 else None, stats.forward(index, inputs, z)))
        for sink in self.sinks:  # (a layer reached by no call kept: not this step's)
            sink.grad = None
        return items
