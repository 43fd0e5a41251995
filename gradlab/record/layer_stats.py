"""How a recorder collects each step's f' statistics: a chunk of a plain MLP's hidden outputs at
a time (``ChunkedStats``), or each call of any other model's layers (``CallStats``).

Both take the forward hook's ``(index, inputs, z)``, count each step's elements of z per layer
(``numel``), and put their statistics into the recorder's ``RowBuffers``: ``act`` (rows,
layers, 3: sum f', saturated count, dead count) and, for relu-family layers, ``counts`` (each
unit's count of z > 0), from which ``finish`` derives the same three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..activations import get
from . import fprime
from .buffers import RowBuffers
from .layers import Layer


class ChunkedStats:
    """A plain MLP's f' statistics (``Linear, act, …, Linear``, one activation): f' of sigmoid,
    tanh and the relu family is a function of the activation's output, which is the next
    Linear's input, so it is read there (else z is kept, copied where an in-place activation
    would overwrite it), and the statistics of a chunk of steps are taken at once."""

    count_width = 0

    def __init__(self, model: nn.Module, layers: list[Layer], activation: str):
        self.activation = get(activation)
        self.from_output = self.activation.from_output is not None
        self.derivative = fprime.derivative_into(activation, self.from_output)
        self.copy_z = any(getattr(m, "inplace", False) for m in model.modules())
        self.n = len(layers)
        widths = [layer.units for layer in layers[:-1]]
        self.segments = fprime.hidden_segments(widths, layers[0].value.device,
                                               layers[0].value.dtype)
        self.widths = widths
        self.hidden: list[torch.Tensor | None] = [None] * len(widths)
        self.buffers: RowBuffers | None = None
        self.chunk: torch.Tensor | None = None
        self.work: torch.Tensor | None = None
        self.start = self.rows = 0  # recorded row of the chunk's first entry; rows in it
        self.batch = -1
        self.numel = [0] * self.n

    def begin(self, row: int) -> None:
        self.numel = [0] * self.n  # (Python ints: numpy in the step loop costs more)

    def restart(self) -> None:
        """(The chunk holds the last forward's outputs: nothing to forget.)"""

    def commit(self, call: None) -> None:
        """(Each step's statistics are those of its last forward pass.)"""

    def forward(self, index: int, inputs: tuple, z: torch.Tensor) -> None:
        if self.from_output:
            if index > 0:
                self.hidden[index - 1] = inputs[0]  # autograd saves it: nothing overwrites it
        elif index < len(self.hidden):
            self.hidden[index] = z.detach().clone() if self.copy_z else z.detach()

    def end_step(self, row: int) -> list[int]:
        """Keep this step's hidden outputs in the chunk; returns its elements of z per layer."""
        hidden, numel = self.hidden, self.numel
        self.hidden = [None] * len(hidden)
        if not hidden or any(h is None for h in hidden):  # a layer was skipped: no statistics
            return numel
        batch = hidden[0].shape[0]
        numel[:-1] = [batch * width for width in self.widths]
        chunk = self.chunk
        if chunk is not None and (chunk.shape[1] != batch or self.rows == chunk.shape[0]
                                  or self.start + self.rows != row):
            self.flush()
            chunk = self.chunk
        if chunk is None or chunk.shape[1] != batch:
            width = self.segments.shape[0]
            rows = max(1, fprime.CHUNK_BYTES // (batch * width * hidden[0].element_size()))
            chunk = self.chunk = hidden[0].new_empty((rows, batch, width))
            self.work = torch.empty_like(chunk)
        if self.rows == 0:
            self.start = row
        with torch.no_grad():  # (the outputs require grad)
            torch.cat(hidden, dim=1, out=chunk[self.rows])
        self.rows += 1
        return numel

    def flush(self) -> None:
        """Take the statistics of the steps in the chunk, into the buffers."""
        rows = self.rows
        if rows == 0:
            return
        stats = fprime.activation_stats(self.chunk[:rows], self.derivative, self.activation,
                                        self.segments, self.work[:rows])
        self.buffers.act[self.start:self.start + rows, : stats.shape[1]] = stats
        self.rows = 0

    def finish(self, act: np.ndarray, counts: np.ndarray, numel: np.ndarray) -> None:
        """(Nothing to derive: ``act`` holds the statistics.)"""


class CallStats:
    """Any model's f' statistics, taken in each layer's forward hook, before an in-place
    activation can overwrite z: for sigmoid, tanh and the like the sum of f'(z) and the
    saturated count; for the relu family only each unit's count of z > 0 (on a CPU with numba
    one pass, ``engines/positives.py``; else two), from which ``finish`` derives the columns.
    The kernel only counts (NaN is not > 0 in both), so the records are the same bits with
    numba or without."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.count_at: dict[int, slice] = {}  # relu-family layers: their units in ``counts``
        start = 0
        for i, layer in enumerate(layers):
            if layer.activation is not None and layer.activation.relu_family:
                self.count_at[i] = slice(start, start + layer.units)
                start += layer.units
        self.count_width = start
        self.count_positive = (fprime.optional_kernel("positives", "count_positive_into")
                               if start else None)
        self.buffers: RowBuffers | None = None
        self.flags = FlagBuffer()
        self.row = -1
        self.sums: list[torch.Tensor | None] = [None] * len(layers)
        self.numel = [0] * len(layers)

    def begin(self, row: int) -> None:
        self.row = row
        self.restart()

    def restart(self) -> None:
        """Forget the step's statistics so far (its gradient was zeroed: a new one begins)."""
        self.sums = [None] * len(self.layers)
        self.numel = [0] * len(self.layers)

    def forward(self, index: int, inputs: tuple, z: torch.Tensor) -> Call | None:
        """One call's statistics, to ``commit`` to the step once a backward pass uses it."""
        layer = self.layers[index]
        if layer.activation is None:
            return None
        z = z.detach()
        if index in self.count_at:
            # f' is 1 where z > 0, else the slope (0 for relu): each unit's count of positives
            # says all. The counts are integers, exact in float32 below 2**24 per call
            counts = z.new_empty(layer.units, dtype=torch.float32)
            kernel = self.count_positive
            if kernel is None or not kernel(z, layer.axis, counts, False):
                flags = torch.gt(z, 0, out=self.flags.like(z))
                fprime.per_unit_sum(flags, layer.axis, out=counts)
            return Call(index, counts, z.numel())
        return Call(index, fprime.call_stats(z, layer.activation), z.numel())

    def commit(self, call: Call | None) -> None:
        """Add a call's statistics to the step (once)."""
        if call is None or call.committed:
            return
        call.committed = True
        i = call.index
        at = self.count_at.get(i)
        if at is not None:
            counts = self.buffers.counts[self.row, at]
            if self.numel[i] > 0:  # a further call of the layer
                counts.add_(call.stats)
            else:
                counts.copy_(call.stats)
        else:
            previous = self.sums[i]
            self.sums[i] = call.stats if previous is None else previous + call.stats
        self.numel[i] += call.numel

    def end_step(self, row: int) -> list[int]:
        act = self.buffers.act
        if act.is_cpu:  # through a numpy view: 1 µs a layer against 9 µs for torch's setitem
            act = act.numpy()
        for i, sums in enumerate(self.sums):
            if sums is not None:  # (relu-family layers: their counts are in place)
                act[row, i, :2] = sums.numpy() if act is not self.buffers.act else sums
        return self.numel

    def flush(self) -> None:
        """(Nothing pending: each step's statistics are in the buffers.)"""

    def finish(self, act: np.ndarray, counts: np.ndarray, numel: np.ndarray) -> None:
        """The relu-family layers' statistics in ``act`` from their counts (host arrays)."""
        for i, at in self.count_at.items():
            act[:, i] = fprime.relu_family_stats(counts[:, at], numel[:, i],
                                                 self.layers[i].activation)


@dataclass(eq=False)
class Call:
    """One forward call of a layer: its f' statistics (f' sum and saturated count, or each
    unit's count of z > 0) and its elements of z, until a backward pass uses it."""

    index: int
    stats: torch.Tensor
    numel: int
    committed: bool = False


class FlagBuffer:
    """A reused float32 scratch tensor, viewed in each shape asked for: a float pass and its
    sum are several times faster on the CPU than a bool tensor's."""

    def __init__(self):
        self.flat: torch.Tensor | None = None
        self.views: dict[tuple, torch.Tensor] = {}

    def like(self, z: torch.Tensor) -> torch.Tensor:
        """A float32 buffer of ``z``'s shape on its device (contents undefined)."""
        key = (z.shape, z.device)
        view = self.views.get(key)
        if view is None:
            flat = self.flat
            if flat is None or flat.numel() < z.numel() or flat.device != z.device:
                flat = self.flat = z.new_empty(z.numel(), dtype=torch.float32)
                self.views.clear()
            view = self.views[key] = flat[: z.numel()].view(z.shape)
        return view
