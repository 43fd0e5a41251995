"""``StackedMLP``: one or more copies ("members") of a ``build_mlp`` network trained in lockstep by
hand-written backpropagation on stacked parameters, recording the grads columns as it goes.

Why not autograd with the hook recorder (``record.GradientRecorder``): for the tutorial's net at
batch 64 on a CPU the matrix products are only part of a step; the rest is per-op cost
(autograd's graph and engine, module calls, Python hooks), and hooks and one norm call per tensor
make recording every step costly (``benchmarks/RESULTS.md``). Here a step is 20-odd tensor ops,
the same for one member or many (their products are batched with ``bmm``), and what the recorder
needs is at hand. The engine is composed of parts with one job each:

* ``layout``: the flat buffer (weights, gradients, dL/dz) and its per-batch views, laid out so
  that every norm of a step takes one pass;
* ``optim``: SGD (momentum, weight decay) or Adam on the flat buffer, and clipping; SGD's update
  is known without a snapshot of the weights (``-lr * grad``, or the momentum buffer), Adam's is
  the difference to a snapshot;
* ``recording``: the recorded rows; the hidden layers' outputs (or, where f' needs it, their
  inputs z) are written side by side into a row of a chunk buffer, recorded step or not, so a
  recorded step leaves them in place and the f' statistics are taken for a chunk of steps at once;
* this module: the forward and backward step, with ``fused``'s and ``sparse``'s numba kernels
  where they apply (a CPU, float32).

The backward pass uses autograd's own formulas for each activation (``sigmoid_backward`` etc.);
the tests check the gradients and every recorded value against autograd and against
``GradientRecorder``. Each member keeps its ``nn.Sequential``, whose parameters become views of
the stacked buffer, for evaluation and inspection. Column semantics: see ``record``.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..activations import LEAKY_SLOPE, SATURATION
from ..compat import version
from ..models import linear_layers
from .act_kernels import get
from .layout import BatchViews, FlatBuffer, batch_views
from .optim import FlatOptimizer
from .recording import StepRecords

_listed = None  # (weak reference to x, its version, lists): StackedMLP.first_layers' last x


def _sparse_kernels(reference: torch.Tensor, fused: bool, input_density: float):
    """``gradlab.engines.sparse`` when the first layer should skip zero inputs: fused kernels
    on, a CPU, float32, inputs sparse enough, numba importable; else None."""
    if not fused or reference.device.type != "cpu" or reference.dtype != torch.float32:
        return None
    try:
        from . import sparse
    except (ImportError, OSError, RuntimeError):  # numba missing or broken: dense, slower
        return None
    return sparse if input_density <= sparse.MAX_DENSITY else None


def _fused_kernels(reference: torch.Tensor):
    """``gradlab.engines.fused`` where it applies (float32 on a CPU), else None."""
    if reference.device.type != "cpu" or reference.dtype != torch.float32:
        return None
    try:
        from . import fused
    except (ImportError, OSError, RuntimeError) as e:  # numba missing or broken: eager
        warnings.warn(f"the fused engine runs its eager PyTorch path, without its numba "
                      f"kernels ({type(e).__name__}: {e}); pip install 'gradlab[fast]' "
                      f"for them", stacklevel=3)
        return None
    return fused


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
        fused: use ``fused``'s kernels where they apply (a CPU, float32); False keeps every
            step in eager PyTorch (the same updates bit for bit; a reference for tests).
        input_density: the fraction of nonzero inputs (see ``batches.nonzero_fraction``); with
            the fused kernels and at most ``sparse.MAX_DENSITY``, the first layer's products
            skip the zeros (``sparse``; equal to the dense products up to rounding) and its
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
        self.buffer = FlatBuffer(shapes, self.size, batch_size, device=self.device,
                                 dtype=self.dtype, transposed_first=self._sparse is not None)
        buf = self.buffer
        self.params, self.grads = buf.params, buf.grads
        self.W, self.b, self.gW, self.gb = buf.W, buf.b, buf.gW, buf.gb
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
        self.kernels = _fused_kernels(ref) if fused else None
        self.clip = clip_grad_norm
        self.optimizer = FlatOptimizer(buf, optimizer, lr, momentum, weight_decay,
                                       clip_grad_norm, self.kernels)
        self.lr = lr
        # the f' statistics with the update, in one kernel pass: plain SGD, f' from the output
        fused_stats = (self.optimizer.fused_sgd and self.activation.code is not None and n > 1)
        self.records = StepRecords(buf, self.optimizer, self.activation, max(max_rows, 1),
                                   self.kernels, fused_stats)
        self._per_batch: dict[int, BatchViews] = {}
        self._current_batch = batch_size
        self._views: BatchViews | None = None
        self._minus_one: dict[int, torch.Tensor] = {}
        # the activation's kernel form (-1: none): fused.head also takes the layer below's f'
        # when it is a function of h, its output
        self._code = -1
        if self.kernels is not None:
            self._code = self.activation.code if self.activation.code is not None else -1
            self._np = dict(flat=buf.flat.numpy(), params=self.params.numpy(),
                            grads=self.grads.numpy())
            # per member: where W0 (transposed) and b0 start in the parameters (and W0's
            # gradient in the gradients), for the sparse first layer
            self._first_at = np.stack([buf.params_layout.starts(0),
                                       buf.params_layout.starts(1)])

    def _batch_views(self, batch: int) -> BatchViews:
        """The buffers for this batch size (made once per size)."""
        views = self._per_batch.get(batch)
        if views is None:
            views = self._per_batch[batch] = self._make_batch_views(batch)
        if batch != self._current_batch:
            if self._views is not None:
                self.records.process_chunk(self._views)  # the other batch size's
            # dL/dz blocks move with the batch size: clear stale values between them
            self.buffer.deltas.zero_()
            self._current_batch = batch
        self._views = views
        return views

    def _make_batch_views(self, batch: int) -> BatchViews:
        views = batch_views(self.buffer, batch, one_row=self.records.fused_stats,
                            sparse=self._sparse is not None, saves=self._saves,
                            kernels=self.kernels)
        if self.kernels is None:
            return views
        fused, n = self.kernels, self.depth
        below = int(self.widths[-2]) if n > 1 else 0
        step = fused.step_spec(
            self.size, batch, width=below, classes=self.classes,
            row_stride=views.chunk.tensor.shape[3] if self._saves == "output" else below,
            code=self._code, record_stats=self.records.fused_stats, slope=LEAKY_SLOPE,
            threshold=SATURATION * self.activation.max_derivative,
            neg_lr=float(self.optimizer.neg_lr))
        head_at = np.zeros(self.size, fused.HEAD_AT)
        if n > 1:
            layout, at = self.buffer.params_layout, views.deltas.at
            head_at["weight"], head_at["bias"] = layout.starts(2 * n - 2), layout.starts(2 * n - 1)
            head_at["delta"], head_at["below_delta"] = at[-1], at[-2]
            head_at["below_bias"] = layout.starts(2 * n - 3)
        return views._replace(step=step, head_at=head_at)

    def flush(self, steps: list[int], epoch: int) -> list[pd.DataFrame]:
        """The grads frame of each member for the steps recorded since the last flush (given
        as ``steps``, in order), and clear the buffers."""
        if self._views is not None:
            self.records.process_chunk(self._views)
        return self.records.flush(steps, epoch)

    def take_correct(self) -> np.ndarray | None:
        """How many examples each member classified right (argmax of its logits) in the steps
        since the last call, when the step counts them (``fused.head``), else None."""
        if self.kernels is None or self.depth < 2:
            return None
        counts = self._correct.copy()
        self._correct[:] = 0
        return counts

    @property
    def sparse(self) -> bool:
        """Whether the first layer's products skip zero inputs (``gradlab.engines.sparse``)."""
        return self._sparse is not None

    # -- the step ------------------------------------------------------------------------------
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
        deltas = views.deltas.views
        head = self.kernels is not None and self.depth > 1
        row = self.records.chunk_rows
        logits, inputs, saved = self.forward(x, views.chunk.slices[row], nonzeros, head)
        last = top = self.depth - 1
        if head:  # the last layer's forward, loss and backward in one numba pass
            logits, losses = self._head(inputs[last], y, views)
            top = last - 1
            delta = deltas[top]
            if self._code < 0:  # f' of the layer below not in the kernel
                delta = self._backward(views.deltas.dh, saved[top], delta)
        else:
            losses, delta = self._loss(logits, y, deltas[last], views)
        for layer in range(top, -1, -1):
            if layer == 0 and self._sparse:
                self._sparse.weight_grad(*self._columns, m_count, batch, x.shape[2],
                                         self._np["flat"], views.deltas.at[0],
                                         int(self.widths[0]), self._np["grads"],
                                         self._first_at[0], self._first_at[1])
            else:
                torch.bmm(delta.transpose(1, 2), inputs[layer], out=self.gW[layer])
                if not (head and layer == top and self._code >= 0):  # else fused.head's
                    torch.sum(delta, 1, out=self.gb[layer])
            if layer > 0:
                delta = self._hidden_backward(torch.bmm(delta, self.W[layer]), saved[layer - 1],
                                              deltas[layer - 1], views, layer - 1)
        if record and self.optimizer.fused_sgd:
            # the update, every norm and f' of the step in one pass (see fused.record_step)
            self.records.record_fused_update(losses, views)
            return losses, logits
        if record:
            self.records.record(losses, views)
        coef = self.optimizer.clip_gradients() if self.clip is not None else None
        if record:
            self.optimizer.take_snapshot()
        self.optimizer.step()
        if record:
            self.records.record_update(coef)
        return losses, logits

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

    def _head(self, h: torch.Tensor, y: torch.Tensor, views: BatchViews
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fused.head``: the last layer's step from its input h (M, B, width); writes its
        gradients, its dL/dz and dL/dh (``views.deltas.dh``); returns the logits and losses."""
        m_count, batch, width = h.shape
        if self._saves == "output":  # h is in a chunk row: where is known beforehand
            array = views.chunk.storage
            at = views.chunk.hidden_at[self.records.chunk_rows][-1]
        else:  # contiguous rows of ``width`` (the step record's row_stride)
            array, at = h.view(-1).numpy(), np.arange(m_count) * (batch * width)
        logits = torch.empty((m_count, batch, self.classes), device=self.device,
                             dtype=self.dtype)
        losses = torch.empty(m_count, device=self.device, dtype=self.dtype)
        self.kernels.head(array, at, self._np["params"], self._np["grads"], self._np["flat"],
                          views.deltas.dh_array, y.reshape(-1).numpy(), logits.view(-1).numpy(),
                          losses.numpy(), self._correct, views.head_at, views.step)
        return logits, losses

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
              views: BatchViews) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's mean cross-entropy (M,), and dL/dlogits written into ``delta``."""
        m_count, batch, _ = logits.shape
        if self.kernels is not None:  # one numba pass instead of seven small ops
            losses = torch.empty(m_count, device=self.device, dtype=self.dtype)
            self.kernels.cross_entropy(logits.reshape(-1).numpy(), y.reshape(-1).numpy(),
                                       losses.numpy(), self._np["flat"], views.deltas.at[-1],
                                       views.step)
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

    def _hidden_backward(self, g: torch.Tensor, a: torch.Tensor, out: torch.Tensor,
                         views: BatchViews, layer: int) -> torch.Tensor:
        """Hidden layer ``layer``'s dL/dz into ``out`` from dL/da = g (M, B, width) and what
        its backward reads (``a``): ``fused.backward`` (one call, PyTorch's formulas) when it
        knows the activation, else the activation's PyTorch kernel."""
        if self.kernels is None or self._code < 0 or views.chunk.hidden_at is None:
            return self._backward(g, a, out)
        at = views.chunk.hidden_at[self.records.chunk_rows][layer]
        self.kernels.backward(g.view(-1).numpy(), views.chunk.storage, at, self._np["flat"],
                              views.deltas.at[layer], g.shape[2], views.step)
        return out

    # -- the sparse first layer ----------------------------------------------------------------
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
            z = torch.empty((stop - start, width), device=self.device, dtype=self.dtype)
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
        z, array, at, stride = views.first[self.records.chunk_rows if out is not None else 0]
        sp.forward(lists["pair_start"], lists["keys"], lists["first"], lists["second"],
                   int(lists["steps"][j]), members, batch, self._np["params"],
                   self._first_at[0], self._first_at[1], int(self.widths[0]), array, at, stride)
        return z
