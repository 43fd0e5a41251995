"""``StackedMLP``: one or more copies ("members") of a ``build_mlp`` network trained in lockstep by
hand-written backpropagation on stacked parameters, recording the grads columns as it goes.

Why not autograd with the hook recorder (``record.GradientRecorder``): for the tutorial's net at
batch 64 on a CPU the matrix products are only two thirds of a step; the rest is per-op cost
(autograd's graph and engine, module calls, Python hooks), and hooks and one norm call per tensor
made recording every step cost ~40 % more. Here a step is 20-odd tensor ops, the same for one
member or many (their products are batched with ``bmm``), and what the recorder needs is at hand:

* weights, gradients and the backward pass's dL/dz live in one flat buffer, each (member, tensor)
  block starting at a multiple of ``SEGMENT`` floats with zeros between blocks, so the squared
  norms of all of them are per-row norms of the buffer seen as (rows, SEGMENT) summed per block:
  four ops for every norm of a step, whatever the depth and the number of members;
* SGD's update is known without a snapshot of the weights (``-lr * grad``, or the momentum
  buffer); Adam's is the difference to a snapshot;
* the hidden layers' outputs (or, where f' needs it, their inputs z) are written side by side
  into a row of a chunk buffer, recorded step or not, so a recorded step leaves them in place
  and the f' statistics are taken for a chunk of steps at once (``record.activation_stats``).

The backward pass uses autograd's own kernels for each activation (``sigmoid_backward`` etc.);
the tests check the gradients and every recorded value against autograd and against
``GradientRecorder``. Each member keeps its ``nn.Sequential``, whose parameters become views of
the stacked buffer, for evaluation and inspection. Column semantics: see ``record``.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..activations import LEAKY_SLOPE, get
from ..compat import version
from ..models import linear_layers
from ..record import (
    CHUNK_BYTES,
    SATURATION,
    activation_stats,
    derivative_into,
    grads_frame,
    hidden_segments,
)

_listed = None  # (weak reference to x, its version, lists): StackedMLP.first_layers' last x
SEGMENT = 256  # floats per row of the norm view; every block starts at a multiple of it


def _padded(numel: int) -> int:
    return -(-numel // SEGMENT) * SEGMENT


class _Layout:
    """Blocks of a flat buffer: each (member, tensor) block starts at a multiple of SEGMENT."""

    def __init__(self, members: int):
        self.members, self.end = members, 0
        self.blocks: list[tuple[int, int, tuple[int, ...]]] = []  # offset, member stride, shape

    def add(self, shape: tuple[int, ...]) -> None:
        stride = _padded(math.prod(shape))
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
        return first, first + _padded(math.prod(shape)) // SEGMENT


class _BlockNorms:
    """Squared norms of chosen blocks of a flat buffer made of ``regions`` (layouts laid end to
    end from its start), with one norm pass: every row of the (rows, SEGMENT) view belongs to
    one (block, member), so per-row norms summed per block (``segment_reduce``) are the
    blocks' squared norms, and a block's inf or nan stays in that block."""

    def __init__(self, regions: list[_Layout], wanted: list[tuple[int, int, int]], device):
        index, lengths, owners = {}, [], []
        for r, layout in enumerate(regions):
            for block in range(len(layout.blocks)):
                for member in range(layout.members):
                    first, last = layout.rows(block, member)
                    index[(r, block, member)] = len(index)
                    lengths.append(last - first)
                    owners.append(member)
        self.rows, self.count = sum(lengths), len(index)
        lengths = torch.tensor(lengths)
        self.lengths = lengths.to(device)
        self.owner = torch.repeat_interleave(torch.tensor(owners), lengths).to(device)
        self.order = torch.tensor([index[w] for w in wanted], device=device)
        # segment_reduce exists for cpu and cuda; elsewhere (mps) a float32 index_add_
        self._ids = (None if torch.device(device).type in ("cpu", "cuda") else
                     torch.repeat_interleave(torch.arange(self.count), lengths).to(device))

    def __call__(self, buffer: torch.Tensor, out: torch.Tensor) -> None:
        view = buffer[: self.rows * SEGMENT].view(self.rows, SEGMENT)
        squares = torch.linalg.vector_norm(view, dim=1).square_()
        if self._ids is None:  # unsafe: no check of the lengths, which would wait for the device
            sums = torch.segment_reduce(squares, "sum", lengths=self.lengths, unsafe=True)
        else:
            sums = squares.new_zeros(self.count).index_add_(0, self._ids, squares)
        torch.index_select(sums, 0, self.order, out=out)


class _BatchViews(NamedTuple):
    deltas: list[torch.Tensor]  # dL/dz per layer, (M, B, width) views of the flat buffer
    norms: _BlockNorms  # the norms of a recorded step
    chunk: torch.Tensor  # (rows, M, B, sum of hidden widths): hidden a (or z) of several steps
    slices: list[list[torch.Tensor]]  # per chunk row, its per-layer views
    work: torch.Tensor  # scratch of chunk's shape
    storage: np.ndarray | None  # on a CPU: chunk's 1-d storage, a chunk row is ``row`` floats
    row: int
    delta_blocks: np.ndarray  # (layers * members, 3): start, stop, norm index (fused kernel)
    first: list | None  # per chunk row, the sparse first layer's z: tensor, its storage as an
    #                     array, the members' offsets in it, its row stride
    delta_at: np.ndarray  # (layers, members): where each dL/dz block starts in the flat buffer
    dh: torch.Tensor  # dL/d(input of the last layer), from fused.head
    dh_array: np.ndarray | None  # its storage as an array (on a CPU)
    hidden_at: list | None  # per chunk row and hidden layer, where its a is in ``storage``:
    #                         the members' offsets, the row stride (a CPU, a saved as output)


def _sparse_kernels(reference: torch.Tensor, fused: bool, input_density: float):
    """``gradlab.sparse`` when the first layer should skip zero inputs: fused kernels on, a CPU,
    float32, inputs sparse enough, numba importable; else None."""
    if not fused or reference.device.type != "cpu" or reference.dtype != torch.float32:
        return None
    try:
        from . import sparse
    except (ImportError, OSError, RuntimeError):  # numba missing or broken: dense, slower
        return None
    return sparse if input_density <= sparse.MAX_DENSITY else None


class StackedMLP:
    """Train ``models`` (``build_mlp`` networks of one architecture) together, step by step.

    Args:
        models: the members, already initialised; their parameters become views of the stacked
            buffer (so the modules keep reflecting training).
        activation: the activation name of the hidden layers.
        batch_size: the largest batch a step gets.
        optimizer: ``sgd`` or ``adam``; ``lr``, ``momentum``, ``weight_decay`` as in RunConfig
            (SGD: PyTorch's semantics, dampening 0, no nesterov; Adam: ``torch.optim.Adam``).
        clip_grad_norm: scale each member's gradient to at most this total norm, as
            ``nn.utils.clip_grad_norm_`` would for that member alone, after it is recorded.
        max_rows: the most steps recorded between two ``flush`` calls.
        fused: use ``gradlab.fused``'s kernels where they apply (a CPU, float32); False keeps
            every step in eager PyTorch (the same updates bit for bit; a reference for tests).
        input_density: the fraction of nonzero inputs (see ``data.nonzero_fraction``); with the
            fused kernels and at most ``sparse.MAX_DENSITY``, the first layer's products skip
            the zeros (``gradlab.sparse``; equal to the dense products up to rounding) and its
            weights are stored transposed.
    """

    def __init__(self, models: list[nn.Module], activation: str, *, batch_size: int,
                 optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0, clip_grad_norm: float | None = None,
                 max_rows: int = 0, fused: bool = True, input_density: float = 1.0):
        members = [linear_layers(m) for m in models]
        self.size = len(models)
        self.depth = n = len(members[0])
        ref = members[0][0].weight
        self.device, self.dtype = ref.device, ref.dtype
        shapes = [(lin.out_features, lin.in_features) for lin in members[0]]
        self.widths = np.array([o for o, _ in shapes], dtype=np.float64)
        self.classes = shapes[-1][0]
        self.batch_size = batch_size
        self._sparse = _sparse_kernels(ref, fused, input_density)
        self._density = input_density
        self._correct = np.zeros(self.size, np.int64)  # see take_correct
        self._group_lists: list[dict | None] = [None, None, None]  # see list_nonzeros
        # the flat buffer: parameters (W0, b0, W1, ...), then gradients, then dL/dz per layer;
        # with the sparse first layer, W0 is stored transposed (input-major)
        self._params = _Layout(self.size)
        for layer, (o, i) in enumerate(shapes):
            self._params.add((i, o) if layer == 0 and self._sparse else (o, i))
            self._params.add((o,))
        size = self._params.end
        self._flat = torch.zeros(2 * size + self._delta_layout(batch_size).end,
                                 device=self.device, dtype=self.dtype)
        self.params, self.grads = self._flat[:size], self._flat[size:2 * size]
        blocks = [self._params.view(self.params, k) for k in range(2 * n)]
        gblocks = [self._params.view(self.grads, k) for k in range(2 * n)]
        if self._sparse:
            blocks[0], gblocks[0] = blocks[0].transpose(1, 2), gblocks[0].transpose(1, 2)
        self.W, self.b, self.gW, self.gb = blocks[0::2], blocks[1::2], gblocks[0::2], gblocks[1::2]
        with torch.no_grad():
            for m, linears in enumerate(members):
                for layer, lin in enumerate(linears):
                    self.W[layer][m].copy_(lin.weight)
                    self.b[layer][m].copy_(lin.bias)
                    lin.weight.data = self.W[layer][m]  # the member's module now reads the stack
                    lin.bias.data = self.b[layer][m]
        self._Wt = [w.transpose(1, 2) for w in self.W]
        self._b3 = [b.unsqueeze(1) for b in self.b]
        self.activation = get(activation)
        self._act = self.activation.module()
        self._saves = self.activation.saves
        self._act_into, self._backward = self.activation.forward_into, self.activation.backward
        self._derivative = derivative_into(activation, self._saves == "output")
        self._segments = hidden_segments([int(w) for w in self.widths[:-1]], self.device)
        self._kw = dict(device=self.device, dtype=self.dtype)
        self._per_batch: dict[int, _BatchViews] = {}
        self._current_batch = batch_size
        self._chunk_rows = 0
        self._minus_one: dict[int, torch.Tensor] = {}
        # the norms of the update's source buffer (weights; see _record_update) and of each
        # member's gradient (for clipping)
        self._update_norms = _BlockNorms(
            [self._params], [(0, 2 * k, m) for m in range(self.size) for k in range(n)],
            self.device)
        self._grad_norms = _BlockNorms(
            [self._params], [(0, k, m) for m in range(self.size) for k in range(2 * n)],
            self.device)
        self._setup_optimizer(optimizer, lr, momentum, weight_decay)
        self.clip = clip_grad_norm
        self._buffers(max(max_rows, 1))
        self._fused_sgd = self._fused_stats = False
        self._stats_code = None
        self._fused = self._fused_kernels(activation) if fused else None

    def _fused_kernels(self, activation: str):
        """``gradlab.fused`` where it applies (float32 on a CPU), else None. Its SGD step
        with norms serves plain SGD without clipping (``self._fused_sgd``); its f' statistics
        the activations whose f' is a function of their output (``self._stats_code``)."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        try:
            from . import fused
        except (ImportError, OSError, RuntimeError) as e:  # numba missing or broken: eager
            warnings.warn(f"the fused engine runs its eager PyTorch path, without its numba "
                          f"kernels ({type(e).__name__}: {e}); pip install 'gradlab[fast]' "
                          f"for them", stacklevel=2)
            return None
        n = self.depth
        self._fused_sgd = (self._adam is None and self.momentum == 0 and self.weight_decay == 0
                           and self.clip is None)
        self._bounds = np.cumsum([0, *self.widths[:-1]]).astype(np.int64)
        self._stats_code = self.activation.code
        self._fused_stats = self._fused_sgd and self._stats_code is not None and n > 1
        # fused.head also takes the layer below's f' when it is a function of h, its output
        self._head_code = self._stats_code if self._stats_code is not None else -1
        self._stats_args = (self._bounds, self._stats_code if self._fused_stats else -1,
                            np.float32(SATURATION * self.activation.max_derivative),
                            np.float32(LEAKY_SLOPE))
        # per (member, parameter tensor): its elements, and where the squared norms of the
        # tensor and of its gradient go in a row of self._norms (-1: not recorded)
        blocks = []
        for k, (offset, stride, shape) in enumerate(self._params.blocks):
            layer, is_bias = divmod(k, 2)
            for m in range(self.size):
                start, base = offset + m * stride, m * 4 * n
                if is_bias:
                    blocks.append((start, start + shape[0], -1, base + 2 * n + layer))
                else:
                    blocks.append((start, start + math.prod(shape), base + 3 * n + layer,
                                   base + n + layer))
        self._param_blocks = np.array(blocks, dtype=np.int64)
        size = self._params.end
        self._np = dict(flat=self._flat.numpy(), params=self.params.numpy(),
                        grads=self.grads.numpy(),
                        deltas=self._flat[2 * size:].numpy(), norms=self._norms.numpy(),
                        act=self._act_stats.numpy())
        self._neg_lr = np.float32(-self.lr)
        # per member: where W0 (transposed) and b0 start in the parameters (and W0's gradient
        # in the gradients), for the sparse first layer
        self._first_at, self._head_at = (
            np.array([self._params.blocks[k][0] + m * self._params.blocks[k][1]
                      for k in blocks for m in range(self.size)],
                     dtype=np.int64).reshape(2, self.size)
            for blocks in ((0, 1), (2 * n - 2, 2 * n - 1)))
        # the bias of the layer below the last: its gradient comes from fused.head, with f'
        self._below_bias_at = np.array(
            [self._params.blocks[2 * n - 3][0] + m * self._params.blocks[2 * n - 3][1]
             for m in range(self.size)] if n > 1 else [], dtype=np.int64)
        self._fused_args = (self._np["params"], self._np["grads"], self._neg_lr,
                            self._param_blocks, self._np["deltas"])
        self._norm_rows = self._np["norms"].reshape(self._norms.shape[0], -1)
        return fused

    def _delta_layout(self, batch: int) -> _Layout:
        layout = _Layout(self.size)
        for width in self.widths:
            layout.add((batch, int(width)))
        return layout

    def _batch_views(self, batch: int) -> _BatchViews:
        """The buffers for this batch size (made once per size)."""
        views = self._per_batch.get(batch)
        if views is None:
            views = self._per_batch[batch] = self._make_batch_views(batch)
        if batch != self._current_batch:
            self._process_chunk()  # the other batch size's
            # dL/dz blocks move with the batch size: clear stale values between them
            self._flat[2 * self._params.end:].zero_()
            self._current_batch = batch
        self._views = views
        return views

    def _make_batch_views(self, batch: int) -> _BatchViews:
        layout = self._delta_layout(batch)
        base = 2 * self._params.end
        deltas = [layout.view(self._flat[base:], k) for k in range(self.depth)]
        n = self.depth
        wanted = []  # per member: dL/dz, grad W, grad b, W (the recorder's column order)
        for m in range(self.size):
            wanted += [(2, k, m) for k in range(n)]
            wanted += [(1, 2 * k, m) for k in range(n)]
            wanted += [(1, 2 * k + 1, m) for k in range(n)]
            wanted += [(0, 2 * k, m) for k in range(n)]
        norms = _BlockNorms([self._params, self._params, layout], wanted, self.device)
        # Every hidden layer's a (or z) goes side by side into a row of a chunk: the row after
        # the recorded ones, so a recorded step leaves them there, and the f' statistics are
        # taken for a chunk of steps at once. Rows start at multiples of 16 floats (64 bytes),
        # so recorded or not, a step computes the same products on equally laid out operands.
        width = self._segments.shape[0]
        row = -(-self.size * batch * width // 16) * 16
        rows = max(1, CHUNK_BYTES // (row * self._flat.element_size())) if n > 1 else 1
        if self._fused_stats:  # taken step by step, with the update: one row, kept in cache
            rows = 1
        storage = self._flat.new_zeros(rows * row)
        chunk = storage.as_strided((rows, self.size, batch, width),
                                   (row, batch * width, width, 1))
        starts = np.cumsum([0, *self.widths[:-1]]).astype(int)
        slices = [[chunk[r, ..., starts[k]:starts[k + 1]] for k in range(n - 1)]
                  for r in range(rows)]
        delta_blocks = np.array(
            [(start, start + math.prod(shape), m * 4 * n + k)
             for k, (offset, stride, shape) in enumerate(layout.blocks)
             for m in range(self.size) for start in [offset + m * stride]],
            dtype=np.int64).reshape(-1, 3)
        first = None
        if self._sparse:
            # where the first layer's z goes: into the chunk row (gelu & co.), or a buffer
            if self._saves == "input" and n > 1:
                targets, array = [hidden[0] for hidden in slices], storage.numpy()
            else:
                targets = [torch.empty((self.size, batch, int(self.widths[0])), **self._kw)]
                array = targets[0].view(-1).numpy()
            first = [(t, array, t.storage_offset() + t.stride(0) * np.arange(self.size),
                      t.stride(1)) for t in targets]
        delta_at = np.array([[d.storage_offset() + m * d.stride(0) for m in range(self.size)]
                             for d in deltas], dtype=np.int64)
        dh = torch.empty((self.size, batch, int(self.widths[-2]) if n > 1 else 0), **self._kw)
        cpu = storage.device.type == "cpu"
        hidden_at = [[(t.storage_offset() + t.stride(0) * np.arange(self.size), t.stride(1))
                      for t in hidden] for hidden in slices] if (
            cpu and n > 1 and self._saves == "output") else None
        return _BatchViews(deltas, norms, chunk, slices, torch.empty(chunk.shape, **self._kw),
                           storage.numpy() if cpu else None, row, delta_blocks, first,
                           delta_at, dh, dh.view(-1).numpy() if cpu else None, hidden_at)

    # -- optimizer -------------------------------------------------------------------------------
    def _setup_optimizer(self, name: str, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._adam = None
        self._momentum_buffer = self._decayed = self._snapshot = None
        if name == "adam":
            param = nn.Parameter(self.params)  # shares the storage: Adam updates the stack
            param.grad = self.grads
            self._adam = torch.optim.Adam([param], lr=lr, weight_decay=weight_decay,
                                          foreach=True)
            self._snapshot = self._update_source = torch.empty_like(self.params)
            return
        if weight_decay != 0:
            self._decayed = self._update_source = torch.empty_like(self.params)
        else:
            self._update_source = None  # the update is -lr * grad
        if momentum != 0:
            self._momentum_buffer = self._update_source = torch.empty_like(self.params)
            self._momentum_started = False

    def _optimizer_step(self) -> None:
        """SGD exactly as ``torch.optim.SGD`` computes it (dampening 0, no nesterov), on the
        flat buffer; or ``torch.optim.Adam``."""
        if self._adam is not None:
            self._adam.step()
            return
        grad = self.grads
        if self._decayed is not None:
            grad = torch.add(grad, self.params, alpha=self.weight_decay, out=self._decayed)
        if self._momentum_buffer is not None:
            if self._momentum_started:
                self._momentum_buffer.mul_(self.momentum).add_(grad)
            else:  # SGD's first step: the buffer is a copy of the gradient
                self._momentum_buffer.copy_(grad)
                self._momentum_started = True
            grad = self._momentum_buffer
        if self._fused_sgd:  # gradlab.fused's loop: the same arithmetic, a little faster
            self._fused.sgd_step(self._np["params"], self._np["grads"], self._neg_lr)
        else:
            self.params.add_(grad, alpha=-self.lr)

    def _clip(self) -> torch.Tensor:
        """Scale each member's gradient as ``clip_grad_norm_`` would; returns the factors."""
        rows = self._params.end // SEGMENT
        squares = self._clip_squares
        self._grad_norms(self.grads, squares)
        total = squares.view(self.size, -1).sum(1).sqrt_()
        coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
        self.grads.view(rows, SEGMENT).mul_(coef.index_select(0, self._grad_norms.owner)[:, None])
        return coef

    # -- the step ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, hidden: list[torch.Tensor], nonzeros=None,
                head: bool = False
                ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """Logits (M, B, classes), each layer's input, and what each hidden layer's backward
        needs, for x (M, B, features); ``hidden``: where each hidden layer's a (or z) goes;
        ``nonzeros``: x's nonzeros listed beforehand (see ``step``); ``head``: stop before
        the last layer (no logits), which ``fused.head`` does."""
        inputs, saved = [x], []
        first = hidden[0] if self._saves == "input" and hidden else None
        if self._sparse:
            z = self._sparse_forward(x, first, nonzeros)
        else:
            z = torch.baddbmm(self._b3[0], x, self._Wt[0], out=first)
        for layer in range(1, self.depth):
            if self._saves == "output":
                h = self._act_into(z, hidden[layer - 1])
                saved.append(h)
            else:
                h = self._act(z)
                saved.append(z)
            inputs.append(h)
            if head and layer == self.depth - 1:
                return None, inputs, saved
            out = hidden[layer] if self._saves == "input" and layer < self.depth - 1 else None
            z = torch.baddbmm(self._b3[layer], h, self._Wt[layer], out=out)
        return z, inputs, saved

    def _head(self, h: torch.Tensor, y: torch.Tensor, views: _BatchViews
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fused.head``: the last layer's step from its input h (M, B, width); writes its
        gradients, its dL/dz and dL/dh (``views.dh``); returns the logits and losses."""
        m_count, batch, width = h.shape
        if self._saves == "output":  # h is in a chunk row: where is known beforehand
            array = views.storage
            at, stride = views.hidden_at[self._chunk_rows][-1]
        else:
            array, at, stride = h.view(-1).numpy(), np.arange(m_count) * (batch * width), width
        logits = torch.empty((m_count, batch, self.classes), **self._kw)
        losses = torch.empty(m_count, **self._kw)
        self._fused.head(array, at, stride, width, self._np["params"], self._head_at[0],
                         self._head_at[1], self.classes, y.reshape(-1).numpy(), m_count, batch,
                         logits.view(-1).numpy(), losses.numpy(), self._np["flat"],
                         views.delta_at[-1], self._np["grads"], views.dh_array,
                         self._head_code, self._stats_args[3], views.delta_at[-2],
                         self._below_bias_at, self._correct)
        return logits, losses

    def take_correct(self) -> np.ndarray | None:
        """How many examples each member classified right (argmax of its logits) in the steps
        since the last call, when the step counts them (``fused.head``), else None."""
        if self._fused is None or self.depth < 2:
            return None
        counts = self._correct.copy()
        self._correct[:] = 0
        return counts

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
              views: _BatchViews) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's mean cross-entropy (M,), and dL/dlogits written into ``delta``."""
        m_count, batch, _ = logits.shape
        if self._fused is not None:  # one numba pass instead of seven small ops
            losses = torch.empty(m_count, **self._kw)
            self._fused.cross_entropy(logits.reshape(-1).numpy(), y.reshape(-1).numpy(), m_count,
                                      batch, self.classes, losses.numpy(), self._np["flat"],
                                      views.delta_at[-1])
            return losses, delta
        logp = torch.log_softmax(logits, -1)
        target = y.unsqueeze(-1)
        losses = torch.gather(logp, -1, target).mean((1, 2)).neg_()  # nll_loss, in fewer ops
        minus_one = self._minus_one.get(batch)
        if minus_one is None:
            minus_one = self._minus_one[batch] = logits.new_full((m_count, batch, 1), -1.0)
        torch.exp(logp, out=delta)  # dL/dlogits = (softmax - onehot) / B
        delta.scatter_add_(-1, target, minus_one).mul_(1.0 / batch)
        return losses, delta

    @property
    def sparse(self) -> bool:
        """Whether the first layer's products skip zero inputs (``gradlab.sparse``)."""
        return self._sparse is not None

    def list_nonzeros(self, rows: torch.Tensor, slot: int, shapes: list[tuple[int, int]]
                      ) -> dict:
        """The nonzeros of ``rows`` (2-d, float32, on the CPU: several steps' x, step j's of
        shape ``shapes[j]`` = (members, batch) + features) listed for ``step``, by row and, per
        member's batch, by column, in buffers kept per ``slot``: 0 or 1 for ``gather_batches``'s
        ``prepare``, run in its thread; 2 for a step given no lists."""
        count, features = rows.shape
        segments = np.array([0] + [batch for members, batch in shapes for _ in range(members)],
                            dtype=np.int64).cumsum()
        lists = self._group_lists[slot]
        if lists is None:
            lists = self._sparse.buffers(count, features, self._density, len(segments) - 1)
        lists = self._sparse.list_nonzeros(rows.reshape(-1).numpy(), features, lists, segments,
                                           density=self._density)
        # where each step's pairs of rows start (each member's batch taken in pairs)
        lists["steps"] = np.array([0] + [m * ((b + 1) // 2) for m, b in shapes],
                                  dtype=np.int64).cumsum()
        self._group_lists[slot] = lists
        return lists

    def first_layers(self, x: torch.Tensor) -> list:
        """For evaluation with the sparse first layer: per member, a function ``(start, stop)
        -> z`` giving its first-layer z = b + x W^T (current weights) for rows [start, stop) of
        ``x`` (2-d), over x's nonzeros (listed once, for every call and, while x is
        unchanged, for the next engine: the groups of an ensemble share a test set)."""
        global _listed
        count, features = x.shape
        if _listed is not None and _listed[0]() is x and _listed[1] == version(x):
            lists = _listed[2]
        else:
            lists = self._sparse.list_nonzeros(
                x.reshape(-1).numpy(), features, self._sparse.buffers(count, features,
                                                                      self._density),
                np.array([0, count], dtype=np.int64), columns=False)
            _listed = (weakref.ref(x), version(x), lists)
        width = int(self.widths[0])

        def first_layer(start: int, stop: int, member: int) -> torch.Tensor:
            if start % 2:  # the rows are listed in pairs from the first
                raise ValueError(f"start={start} is invalid: it must be even")
            z = torch.empty((stop - start, width), **self._kw)
            self._sparse.forward(lists["pair_start"], lists["keys"], lists["first"],
                                 lists["second"], start // 2, 1, stop - start,
                                 self._np["params"], self._first_at[0, member:member + 1],
                                 self._first_at[1, member:member + 1], width,
                                 z.view(-1).numpy(), np.zeros(1, np.int64), width)
            return z
        return [functools.partial(first_layer, member=m) for m in range(self.size)]

    def _sparse_forward(self, x: torch.Tensor, out: torch.Tensor | None, nonzeros
                        ) -> torch.Tensor:
        """The first layer's z = b + x W^T over x's nonzeros (``nonzeros``: listed beforehand,
        ``(lists, j)``: by ``list_nonzeros``, x being step j of them), into ``out`` (a chunk
        row's) or a buffer."""
        views, sp = self._views, self._sparse
        members, batch, features = x.shape
        if nonzeros is None:
            lists = self.list_nonzeros(x.reshape(-1, features), 2, [(members, batch)])
            j = 0
        else:
            lists, j = nonzeros
        columns = members * features
        # for the weight gradient: this step's nonzeros by column
        self._columns = (lists["column_start"][j * columns:(j + 1) * columns + 1],
                         lists["column_rows"], lists["column_values"])
        z, array, at, stride = views.first[self._chunk_rows if out is not None else 0]
        sp.forward(lists["pair_start"], lists["keys"], lists["first"], lists["second"],
                   int(lists["steps"][j]), members, batch, self._np["params"],
                   self._first_at[0], self._first_at[1], int(self.widths[0]), array, at, stride)
        return z

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool = False, nonzeros=None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of every member on its batch: x (M, B, features), y (M, B).

        Returns each member's mean cross-entropy loss (M,) and the logits (M, B, classes).
        ``record``: record this step (call ``flush`` at an epoch end). ``nonzeros``: with the
        sparse first layer, x's nonzeros listed beforehand (``gather_batches`` with
        ``prepare=self.list_nonzeros`` yields them); else they are listed here. No tensor of
        the engine requires grad: the step builds no autograd graph (x must not require grad).
        """
        m_count, batch = y.shape
        views = self._batch_views(batch)
        deltas = views.deltas
        head = self._fused is not None and self.depth > 1
        logits, inputs, saved = self.forward(x, views.slices[self._chunk_rows], nonzeros, head)
        last = top = self.depth - 1
        if head:  # the last layer's forward, loss and backward in one numba pass
            logits, losses = self._head(inputs[last], y, views)
            top = last - 1
            delta = deltas[top]
            if self._head_code < 0:  # f' of the layer below not in the kernel
                delta = self._backward(views.dh, saved[top], delta)
        else:
            losses, delta = self._loss(logits, y, deltas[last], views)
        for layer in range(top, -1, -1):
            if layer == 0 and self._sparse:
                self._sparse.weight_grad(*self._columns, m_count, batch, x.shape[2],
                                         self._np["flat"], views.delta_at[0],
                                         int(self.widths[0]), self._np["grads"],
                                         self._first_at[0], self._first_at[1])
            else:
                torch.bmm(delta.transpose(1, 2), inputs[layer], out=self.gW[layer])
                if not (head and layer == top and self._head_code >= 0):  # else fused.head's
                    torch.sum(delta, 1, out=self.gb[layer])
            if layer > 0:
                delta = self._hidden_backward(torch.bmm(delta, self.W[layer]), saved[layer - 1],
                                              deltas[layer - 1], views, layer - 1)
        if record and self._fused_sgd:
            # the update, every norm and f' of the step in one pass (see gradlab.fused)
            row = self._record(losses, views, norms=False)
            self._fused.record_step(*self._fused_args, views.delta_blocks, self._norm_rows,
                                    self._np["act"], row, views.storage, self.size, batch,
                                    *self._stats_args)
            return losses, logits
        if record:
            self._record(losses, views)
        coef = self._clip() if self.clip is not None else None
        if record and self._snapshot is not None:
            self._snapshot.copy_(self.params)
        self._optimizer_step()
        if record:
            self._record_update(coef)
        return losses, logits

    def _hidden_backward(self, g: torch.Tensor, a: torch.Tensor, out: torch.Tensor,
                         views: _BatchViews, layer: int) -> torch.Tensor:
        """Hidden layer ``layer``'s dL/dz into ``out`` from dL/da = g (M, B, width) and what
        its backward reads (``a``): ``fused.backward`` (one call, PyTorch's formulas) when it
        knows the activation, else the activation's PyTorch kernel."""
        if self._fused is None or self._head_code < 0 or views.hidden_at is None:
            return self._backward(g, a, out)
        at, stride = views.hidden_at[self._chunk_rows][layer]
        m_count, batch, width = g.shape
        self._fused.backward(g.view(-1).numpy(), views.storage, at, stride, self._np["flat"],
                             views.delta_at[layer], m_count, batch, width, self._head_code,
                             self._stats_args[3])
        return out

    # -- recording -----------------------------------------------------------------------------
    def _buffers(self, rows: int) -> None:
        m_count, n = self.size, self.depth
        f32 = dict(device=self.device, dtype=self.dtype)
        self._norms = torch.full((rows, m_count, 4 * n), math.nan, **f32)  # squared
        self._update = torch.full((rows, m_count, n), math.nan, **f32)  # squared
        self._losses: list[torch.Tensor] = []  # of the recorded steps, stacked at flush
        self._coef = torch.ones((rows, m_count), device=self.device, dtype=self.dtype)
        self._act_stats = torch.full((rows, m_count, n, 3), math.nan, device=self.device,
                                     dtype=self.dtype)
        self._clip_squares = torch.empty(self._grad_norms.order.shape[0], **f32)
        self._batches: list[int] = []
        self._chunk_rows = self._chunk_start = 0

    def _record(self, losses: torch.Tensor, views: _BatchViews, norms: bool = True) -> int:
        """Record this step's row (its norms too, unless ``norms`` is False); returns it."""
        row = len(self._batches)
        if row == self._norms.shape[0]:
            raise RuntimeError(f"more than max_rows={row} recorded steps before flush()")
        self._batches.append(views.chunk.shape[2])
        if norms:
            views.norms(self._flat, self._norms[row].view(-1))
        self._losses.append(losses)
        if self.depth > 1 and not (self._fused_stats and not norms):
            if self._chunk_rows == 0:
                self._chunk_start = row
            self._chunk_rows += 1
            if self._chunk_rows == views.chunk.shape[0]:
                self._process_chunk()
        return row

    def _process_chunk(self) -> None:
        """The f' statistics of the recorded steps whose hidden outputs are in the chunk."""
        rows, start = self._chunk_rows, self._chunk_start
        if not rows:
            return
        views = self._views
        if self._stats_code is not None:
            _, members, batch, _ = views.chunk.shape
            bounds, code, threshold, slope = self._stats_args
            self._fused.activation_stats(views.storage, views.row, rows, members, batch, bounds,
                                         self._stats_code, threshold, slope, self._np["act"],
                                         start)
            self._chunk_rows = 0
            return
        stats = activation_stats(views.chunk[:rows], self._derivative, self.activation,
                                 self._segments, views.work[:rows])
        self._act_stats[start:start + rows, :, : self.depth - 1] = stats
        self._chunk_rows = 0

    def _record_update(self, coef: torch.Tensor | None) -> None:
        """‖ΔW‖² of the update just made: for plain SGD it is lr² ‖grad‖² (times the clip
        factor², applied at flush); else the norm of what was applied."""
        row = len(self._batches) - 1
        if self._update_source is None:
            if coef is not None:
                self._coef[row].copy_(coef)
            return
        if self._snapshot is not None:
            torch.sub(self.params, self._snapshot, out=self._snapshot)
        self._update_norms(self._update_source, self._update[row].view(-1))

    def flush(self, steps: list[int], epoch: int) -> list[pd.DataFrame]:
        """The grads frame of each member for the steps recorded since the last flush (given
        as ``steps``, in order), and clear the buffers."""
        self._process_chunk()
        rows = len(self._batches)
        if len(steps) != rows:
            raise ValueError(f"{len(steps)} steps given for {rows} recorded")
        losses = torch.stack(self._losses) if rows else self._coef[:0]
        norms, update, loss, coef, act = (
            t[:rows].double().cpu().numpy()
            for t in (self._norms, self._update, losses, self._coef, self._act_stats))
        norms = np.sqrt(norms)
        n = self.depth
        if self._update_source is None:
            update = norms[:, :, n:2 * n] * coef[:, :, None] * self.lr
        else:
            update = np.sqrt(update) * (self.lr if self._adam is None else 1.0)
        frames = [grads_frame(steps, epoch, norms[:, m], loss[:, m], update[:, m], act[:, m],
                              self._batches, self.widths, self.activation)
                  for m in range(self.size)]
        for t in (self._norms, self._update, self._act_stats):
            t.fill_(math.nan)
        self._coef.fill_(1.0)
        self._batches, self._losses = [], []
        return frames
