"""The stacked engine's flat buffer: where each (member, tensor) block lies in it, the squared
norms of chosen blocks in one pass, and the views a step of one batch size works on.

Weights, gradients and the backward pass's dL/dz live in one flat buffer, each (member, tensor)
block starting at a multiple of ``SEGMENT`` floats with zeros between blocks, so the squared norms
of all of them are per-row sums of squares of the buffer seen as (rows, SEGMENT), summed per
block: a few ops for every norm of a step, whatever the depth and the number of members.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..record import CHUNK_BYTES

SEGMENT = 256  # floats per row of the norm view; every block starts at a multiple of it


def squares_dtype(device) -> torch.dtype:
    """The dtype of squared norms: float64 (no float32 square underflows), or float32 on a
    device without float64 (Apple's mps)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def padded(numel: int) -> int:
    """``numel`` rounded up to a multiple of SEGMENT."""
    return -(-numel // SEGMENT) * SEGMENT


class Layout:
    """Blocks of a flat buffer: each (member, tensor) block starts at a multiple of SEGMENT."""

    def __init__(self, members: int):
        self.members, self.end = members, 0
        self.blocks: list[tuple[int, int, tuple[int, ...]]] = []  # offset, member stride, shape

    def add(self, shape: tuple[int, ...]) -> None:
        stride = padded(math.prod(shape))
        self.blocks.append((self.end, stride, shape))
        self.end += self.members * stride

    def view(self, buffer: torch.Tensor, block: int) -> torch.Tensor:
        """The (members, *shape) view of ``block`` in ``buffer``."""
        offset, stride, shape = self.blocks[block]
        strides = [stride] + [math.prod(shape[k + 1:]) for k in range(len(shape))]
        return buffer.as_strided((self.members, *shape), strides,
                                 buffer.storage_offset() + offset)

    def rows(self, block: int, member: int) -> tuple[int, int]:
        """The [first, last) rows of the norm view that one member's block occupies."""
        offset, stride, shape = self.blocks[block]
        first = (offset + member * stride) // SEGMENT
        return first, first + padded(math.prod(shape)) // SEGMENT

    def starts(self, block: int) -> np.ndarray:
        """Per member, where its ``block`` starts in the buffer (int64)."""
        offset, stride, _ = self.blocks[block]
        return offset + stride * np.arange(self.members, dtype=np.int64)


class BlockNorms:
    """Squared norms (float64, exact down to the smallest positive float32) of chosen blocks of
    a flat buffer made of ``regions`` (layouts laid end to end from its start).

    On a CPU with the fused kernels (``kernels``), one numba pass over the wanted blocks
    (``fused.block_squares``). Else one norm pass in float64: every row of the (rows, SEGMENT)
    view belongs to one (block, member), so per-row squares summed per block
    (``segment_reduce``) are the blocks' squared norms, and a block's inf or nan stays in that
    block."""

    def __init__(self, regions: list[Layout], wanted: list[tuple[int, int, int]], device,
                 kernels=None):
        index, lengths, owners, spans = {}, [], [], {}
        base = 0  # each region's rows follow the previous region's
        for r, layout in enumerate(regions):
            for block in range(len(layout.blocks)):
                for member in range(layout.members):
                    first, last = layout.rows(block, member)
                    index[(r, block, member)] = len(index)
                    lengths.append(last - first)
                    owners.append(member)
                    spans[(r, block, member)] = ((base + first) * SEGMENT,
                                                 (base + last) * SEGMENT)
            base += layout.end // SEGMENT
        self.rows, self.count = sum(lengths), len(index)
        lengths = torch.tensor(lengths)
        self.lengths = lengths.to(device)
        self.owner = torch.repeat_interleave(torch.tensor(owners), lengths).to(device)
        self.order = torch.tensor([index[w] for w in wanted], device=device)
        self.kernels = kernels if torch.device(device).type == "cpu" else None
        self.ranges = np.array([spans[w] for w in wanted], dtype=np.int64).reshape(-1, 2)
        # segment_reduce exists for cpu and cuda; elsewhere (mps) an index_add_
        self.ids = (None if torch.device(device).type in ("cpu", "cuda") else
                    torch.repeat_interleave(torch.arange(self.count), lengths).to(device))

    def __call__(self, buffer: torch.Tensor, out: torch.Tensor) -> None:
        """The wanted blocks' squared norms into ``out`` (``squares_dtype``, one per wanted
        block)."""
        if self.kernels is not None:
            self.kernels.block_squares(buffer.numpy(), self.ranges, out.numpy())
            return
        view = buffer[: self.rows * SEGMENT].view(self.rows, SEGMENT)
        squares = torch.linalg.vector_norm(view, dim=1, dtype=out.dtype).square_()
        if self.ids is None:  # unsafe: no check of the lengths, which would wait for the device
            sums = torch.segment_reduce(squares, "sum", lengths=self.lengths, unsafe=True)
        else:
            sums = squares.new_zeros(self.count).index_add_(0, self.ids, squares)
        torch.index_select(sums, 0, self.order, out=out)


class FlatBuffer:
    """One flat buffer: parameters (W0, b0, W1, ...), then their gradients, then dL/dz per layer
    (room for the largest batch). With ``transposed_first`` W0 is stored input-major (the
    sparse first layer's products read a pixel's weights as one row).

    Args:
        shapes: (out_features, in_features) per layer.
        members: copies of the network stacked in the buffer.
        batch_size: the largest batch a step gets.
    """

    def __init__(self, shapes: list[tuple[int, int]], members: int, batch_size: int, *,
                 device, dtype, transposed_first: bool = False):
        self.members, self.depth = members, len(shapes)
        self.widths = [o for o, _ in shapes]
        self.params_layout = Layout(members)
        for layer, (o, i) in enumerate(shapes):
            self.params_layout.add((i, o) if layer == 0 and transposed_first else (o, i))
            self.params_layout.add((o,))
        size = self.params_layout.end
        self.flat = torch.zeros(2 * size + self.delta_layout(batch_size).end, device=device,
                                dtype=dtype)
        self.params, self.grads = self.flat[:size], self.flat[size:2 * size]
        self.deltas = self.flat[2 * size:]
        blocks = [self.params_layout.view(self.params, k) for k in range(2 * self.depth)]
        gblocks = [self.params_layout.view(self.grads, k) for k in range(2 * self.depth)]
        if transposed_first:
            blocks[0], gblocks[0] = blocks[0].transpose(1, 2), gblocks[0].transpose(1, 2)
        self.W, self.b, self.gW, self.gb = blocks[0::2], blocks[1::2], gblocks[0::2], gblocks[1::2]

    def delta_layout(self, batch: int) -> Layout:
        """The dL/dz blocks (batch, width) of each layer for a batch of ``batch``."""
        layout = Layout(self.members)
        for width in self.widths:
            layout.add((batch, width))
        return layout

    def param_blocks(self) -> np.ndarray:
        """Per (member, parameter tensor): ``start, stop, weight_out, grad_out``, its elements
        and where the squared norms of the tensor and of its gradient go in a recorded row
        (the recorder's column order per member: dL/dz, grad W, grad b, W; -1: not recorded),
        as ``fused.sgd_step_norms`` takes them."""
        blocks, depth = [], self.depth
        for k, (offset, stride, shape) in enumerate(self.params_layout.blocks):
            layer, is_bias = divmod(k, 2)
            for m in range(self.members):
                start, base = offset + m * stride, m * 4 * depth
                if is_bias:
                    blocks.append((start, start + shape[0], -1, base + 2 * depth + layer))
                else:
                    blocks.append((start, start + math.prod(shape), base + 3 * depth + layer,
                                   base + depth + layer))
        return np.array(blocks, dtype=np.int64)


class Deltas(NamedTuple):
    """dL/dz of each layer for one batch size, in the flat buffer."""
    views: list[torch.Tensor]  # per layer, (M, B, width) views
    at: np.ndarray  # (layers, members): where each block starts in the flat buffer
    blocks: np.ndarray  # (layers * members, 3): start, stop, norm index (fused.sgd_step_norms)
    dh: torch.Tensor  # dL/d(input of the last layer), from fused.head
    dh_array: np.ndarray | None  # its storage as an array (on a CPU)


class Chunk(NamedTuple):
    """Rows of hidden outputs (or inputs z, where f' needs them) of several steps, side by side:
    a recorded step leaves its row in place, and the f' statistics are taken for a chunk of
    steps at once."""
    tensor: torch.Tensor  # (rows, M, B, sum of hidden widths)
    slices: list[list[torch.Tensor]]  # per row, its per-layer views
    work: torch.Tensor  # scratch of the chunk's shape
    storage: np.ndarray | None  # on a CPU: the chunk's 1-d storage; a row is ``row`` floats
    row: int
    hidden_at: list | None  # per row and hidden layer, where its a is in ``storage``: the
    #                         members' offsets (on a CPU, a saved as the activation's output)


class BatchViews(NamedTuple):
    """What a step of one batch size works on (made once per size)."""
    deltas: Deltas
    chunk: Chunk
    norms: BlockNorms  # the norms of a recorded step
    first: list | None  # per chunk row, the sparse first layer's z: tensor, its storage as an
    #                     array, the members' offsets in it, its row stride
    step: np.ndarray | None = None  # the fused kernels' ``fused.STEP`` record for this batch
    head_at: np.ndarray | None = None  # and ``fused.head``'s offsets (``fused.HEAD_AT``)


def batch_views(buffer: FlatBuffer, batch: int, *, one_row: bool, sparse: bool,
                saves: str, kernels=None) -> BatchViews:
    """The views of ``buffer`` for steps of ``batch`` examples. ``one_row``: a chunk of one
    row (f' statistics taken step by step); ``sparse``: the first layer's z gets a buffer the
    sparse kernels write; ``saves``: what the activation's backward reads (``output`` or
    ``input``); ``kernels``: ``fused``, for the norms on a CPU."""
    members, n, flat = buffer.members, buffer.depth, buffer.flat
    kw = dict(device=flat.device, dtype=flat.dtype)
    layout = buffer.delta_layout(batch)
    views = [layout.view(buffer.deltas, k) for k in range(n)]
    params = buffer.params_layout
    wanted = []  # per member: dL/dz, grad W, grad b, W (the recorder's column order)
    for m in range(members):
        wanted += [(2, k, m) for k in range(n)]
        wanted += [(1, 2 * k, m) for k in range(n)]
        wanted += [(1, 2 * k + 1, m) for k in range(n)]
        wanted += [(0, 2 * k, m) for k in range(n)]
    norms = BlockNorms([params, params, layout], wanted, flat.device, kernels)
    chunk = _chunk(buffer, batch, one_row, kw)
    delta_blocks = np.array(
        [(start, start + math.prod(shape), m * 4 * n + k)
         for k, (offset, stride, shape) in enumerate(layout.blocks)
         for m in range(members) for start in [offset + m * stride]],
        dtype=np.int64).reshape(-1, 3)
    first = None
    if sparse:
        # where the first layer's z goes: into the chunk row (gelu & co.), or a buffer
        if saves == "input" and n > 1:
            targets, array = [hidden[0] for hidden in chunk.slices], chunk.storage
        else:
            targets = [torch.empty((members, batch, buffer.widths[0]), **kw)]
            array = targets[0].view(-1).numpy()
        first = [(t, array, t.storage_offset() + t.stride(0) * np.arange(members),
                  t.stride(1)) for t in targets]
    delta_at = np.array([[d.storage_offset() + m * d.stride(0) for m in range(members)]
                         for d in views], dtype=np.int64)
    dh = torch.empty((members, batch, buffer.widths[-2] if n > 1 else 0), **kw)
    cpu = flat.device.type == "cpu"
    if cpu and n > 1 and saves == "output":
        chunk = chunk._replace(hidden_at=[
            [t.storage_offset() + t.stride(0) * np.arange(members) for t in hidden]
            for hidden in chunk.slices])
    deltas = Deltas(views, delta_at, delta_blocks, dh, dh.view(-1).numpy() if cpu else None)
    return BatchViews(deltas, chunk, norms, first)


def _chunk(buffer: FlatBuffer, batch: int, one_row: bool, kw: dict) -> Chunk:
    """Every hidden layer's a (or z) goes side by side into a row of a chunk: the row after
    the recorded ones, so a recorded step leaves them there. Rows start at multiples of 16
    floats (64 bytes), so recorded or not, a step computes the same products on equally laid
    out operands."""
    members, n = buffer.members, buffer.depth
    width = sum(buffer.widths[:-1])
    row = -(-members * batch * width // 16) * 16
    rows = max(1, CHUNK_BYTES // (row * buffer.flat.element_size())) if n > 1 else 1
    if one_row:  # the statistics are taken step by step, with the update: one row, in cache
        rows = 1
    storage = buffer.flat.new_zeros(rows * row)
    tensor = storage.as_strided((rows, members, batch, width), (row, batch * width, width, 1))
    starts = np.cumsum([0, *buffer.widths[:-1]]).astype(int)
    slices = [[tensor[r, ..., starts[k]:starts[k + 1]] for k in range(n - 1)]
              for r in range(rows)]
    cpu = storage.device.type == "cpu"
    return Chunk(tensor, slices, torch.empty(tensor.shape, **kw),
                 storage.numpy() if cpu else None, row, None)
