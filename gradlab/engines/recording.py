"""The stacked engine's records: row buffers of the recorded steps (on the engine's device), the
f' statistics taken a chunk of steps at once, and the flush to one grads frame per member.

Column semantics: see ``gradlab.record``. Squared norms are kept in float64, so a norm is exact
down to the smallest positive float32.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..record import activation_stats, derivative_into, grads_frame, hidden_segments
from .act_kernels import KernelActivation
from .layout import BatchViews, FlatBuffer, squares_dtype
from .optim import FlatOptimizer


class StepRecords:
    """What the recorded steps between two ``flush`` calls leave, one row per step.

    Args:
        buffer, optimizer: the engine's flat buffer and optimizer.
        activation: the hidden layers' activation.
        rows: the most steps recorded between two flushes.
        kernels: ``gradlab.engines.fused`` on a CPU (float32), else None.
        fused_stats: the f' statistics are taken by ``kernels.record_step`` with the update.
    """

    def __init__(self, buffer: FlatBuffer, optimizer: FlatOptimizer,
                 activation: KernelActivation, rows: int, kernels=None,
                 fused_stats: bool = False):
        self.buffer, self.optimizer, self.activation = buffer, optimizer, activation
        self.kernels, self.fused_stats = kernels, fused_stats
        m_count, n = buffer.members, buffer.depth
        device = buffer.flat.device
        f32 = dict(device=device, dtype=buffer.flat.dtype)
        f64 = dict(device=device, dtype=squares_dtype(device))
        self.norms = torch.full((rows, m_count, 4 * n), math.nan, **f64)  # squared
        self.update = torch.full((rows, m_count, n), math.nan, **f64)  # squared
        self.coef = torch.ones((rows, m_count), **f32)  # the clip factors
        self.act_stats = torch.full((rows, m_count, n, 3), math.nan, **f32)
        self.losses: list[torch.Tensor] = []  # of the recorded steps, stacked at flush
        self.batches: list[int] = []
        self.chunk_rows = self.chunk_start = 0  # the chunk's rows holding recorded steps
        self.derivative = derivative_into(activation.name, activation.saves == "output")
        self.segments = hidden_segments(buffer.widths[:-1], device)
        self.bounds = np.cumsum([0, *buffer.widths[:-1]]).astype(np.int64)
        self.stats_code = activation.code if kernels is not None else None
        if kernels is not None:
            self._arrays = (buffer.params.numpy(), buffer.grads.numpy(), buffer.deltas.numpy())
            self._norm_rows = self.norms.numpy().reshape(rows, -1)
            self._act = self.act_stats.numpy()
            self._blocks = buffer.param_blocks()

    def record(self, losses: torch.Tensor, views: BatchViews, norms: bool = True) -> int:
        """Record this step's row (its norms too, unless ``norms`` is False); returns it."""
        row = len(self.batches)
        if row == self.norms.shape[0]:
            raise RuntimeError(f"more than max_rows={row} recorded steps before flush()")
        self.batches.append(views.chunk.tensor.shape[2])
        if norms:
            views.norms(self.buffer.flat, self.norms[row].view(-1))
        self.losses.append(losses)
        if self.buffer.depth > 1 and not (self.fused_stats and not norms):
            if self.chunk_rows == 0:
                self.chunk_start = row
            self.chunk_rows += 1
            if self.chunk_rows == views.chunk.tensor.shape[0]:
                self.process_chunk(views)
        return row

    def record_fused_update(self, losses: torch.Tensor, views: BatchViews) -> None:
        """Record this step and make its plain SGD update, every norm and (with
        ``fused_stats``) f' of the step in one kernel pass (``fused.record_step``)."""
        row = self.record(losses, views, norms=False)
        self.kernels.record_step(*self._arrays, self._blocks,
                                 views.deltas.blocks, self._norm_rows, self._act, row,
                                 views.chunk.storage, self.bounds, views.step)

    def process_chunk(self, views: BatchViews) -> None:
        """The f' statistics of the recorded steps whose hidden outputs are in the chunk."""
        rows, start = self.chunk_rows, self.chunk_start
        if not rows:
            return
        chunk = views.chunk
        if self.stats_code is not None:
            self.kernels.activation_stats(chunk.storage, chunk.row, rows, self.bounds,
                                          views.step, self._act, start)
        else:
            stats = activation_stats(chunk.tensor[:rows], self.derivative, self.activation,
                                     self.segments, chunk.work[:rows])
            self.act_stats[start:start + rows, :, : self.buffer.depth - 1] = stats
        self.chunk_rows = 0

    def record_update(self, coef: torch.Tensor | None) -> None:
        """‖ΔW‖² of the update just made: for plain SGD it is lr² ‖grad‖² (times the clip
        factor², applied at flush); else the norm of what was applied."""
        row = len(self.batches) - 1
        if self.optimizer.update_source is None:
            if coef is not None:
                self.coef[row].copy_(coef)
            return
        self.optimizer.update_squares(self.update[row].view(-1))

    def flush(self, steps: list[int], epoch: int) -> list[pd.DataFrame]:
        """The grads frame of each member for the steps recorded since the last flush (given
        as ``steps``, in order), and clear the buffers. The chunk must be processed first."""
        rows = len(self.batches)
        if len(steps) != rows:
            raise ValueError(f"{len(steps)} steps given for {rows} recorded")
        losses = torch.stack(self.losses) if rows else self.coef[:0]
        norms, update, loss, coef, act = (
            t[:rows].double().cpu().numpy()
            for t in (self.norms, self.update, losses, self.coef, self.act_stats))
        norms = np.sqrt(norms)
        n, lr = self.buffer.depth, self.optimizer.lr
        if self.optimizer.update_source is None:  # lr * ||clipped g||, from the exact norm
            update = norms[:, :, n:2 * n] * coef[:, :, None] * lr
        else:
            update = np.sqrt(update) * (lr if self.optimizer.adam is None else 1.0)
        widths = np.array(self.buffer.widths, dtype=np.float64)
        frames = [grads_frame(steps, epoch, norms[:, m], loss[:, m], update[:, m], act[:, m],
                              self.batches, widths, self.activation)
                  for m in range(self.buffer.members)]
        for t in (self.norms, self.update, self.act_stats):
            t.fill_(math.nan)
        self.coef.fill_(1.0)
        self.batches, self.losses = [], []
        return frames
