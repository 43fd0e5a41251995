"""The stacked engine's optimizer: SGD (momentum, weight decay) or Adam on the flat buffer, and
gradient clipping per member, as ``torch.optim`` and ``clip_grad_norm_`` compute them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .layout import SEGMENT, BlockNorms, FlatBuffer, squares_dtype


class FlatOptimizer:
    """Updates ``buffer.params`` from ``buffer.grads``, every member at once.

    Args:
        buffer: the engine's flat buffer.
        name: ``sgd`` or ``adam``; ``lr``, ``momentum``, ``weight_decay`` as in RunConfig (SGD:
            PyTorch's semantics, dampening 0, no nesterov; Adam: ``torch.optim.Adam``).
        clip: scale each member's gradient to at most this total norm, as
            ``nn.utils.clip_grad_norm_`` would for that member alone (None: no clipping).
        kernels: ``gradlab.engines.fused`` (a CPU, float32), or None: eager PyTorch.

    ``update_source`` is the buffer whose blocks' norms are the update's (the momentum buffer,
    the decayed gradient, or Adam's difference to ``snapshot``), or None when the update is
    ``-lr * grad``; ``fused_sgd`` says the update is plain SGD done by ``kernels``.
    """

    def __init__(self, buffer: FlatBuffer, name: str, lr: float, momentum: float,
                 weight_decay: float, clip: float | None, kernels=None):
        self.buffer, self.lr, self.momentum, self.weight_decay = buffer, lr, momentum, weight_decay
        self.clip = clip
        params = buffer.params
        self.adam = self.momentum_buffer = self.decayed = self.snapshot = None
        self.update_source = None  # the update is -lr * grad
        if name == "adam":
            param = nn.Parameter(params)  # shares the storage: Adam updates the stack
            param.grad = buffer.grads
            self.adam = torch.optim.Adam([param], lr=lr, weight_decay=weight_decay, foreach=True)
            self.snapshot = self.update_source = torch.empty_like(params)
        else:
            if weight_decay != 0:
                self.decayed = self.update_source = torch.empty_like(params)
            if momentum != 0:
                self.momentum_buffer = self.update_source = torch.empty_like(params)
                self.momentum_started = False
        self.kernels = kernels
        self.fused_sgd = kernels is not None and self.update_source is None and clip is None
        self.neg_lr = np.float32(-lr)
        layout, members = buffer.params_layout, buffer.members
        n = buffer.depth
        # each member's gradient blocks (for clipping), and the update's weight blocks
        self.grad_norms = BlockNorms([layout], [(0, k, m) for m in range(members)
                                                for k in range(2 * n)], params.device, kernels)
        self.update_norms = BlockNorms([layout], [(0, 2 * k, m) for m in range(members)
                                                  for k in range(n)], params.device, kernels)
        self._clip_squares = torch.empty(len(self.grad_norms.ranges), device=params.device,
                                         dtype=squares_dtype(params.device))
        if self.fused_sgd:
            self._arrays = (params.numpy(), buffer.grads.numpy())

    def step(self) -> None:
        """SGD exactly as ``torch.optim.SGD`` computes it (dampening 0, no nesterov), on the
        flat buffer; or ``torch.optim.Adam``."""
        if self.adam is not None:
            self.adam.step()
            return
        params = self.buffer.params
        grad = self.buffer.grads
        if self.decayed is not None:
            grad = torch.add(grad, params, alpha=self.weight_decay, out=self.decayed)
        if self.momentum_buffer is not None:
            if self.momentum_started:
                self.momentum_buffer.mul_(self.momentum).add_(grad)
            else:  # SGD's first step: the buffer is a copy of the gradient
                self.momentum_buffer.copy_(grad)
                self.momentum_started = True
            grad = self.momentum_buffer
        if self.fused_sgd:  # the same arithmetic in one numba loop
            self.kernels.sgd_step(*self._arrays, self.neg_lr)
        else:
            params.add_(grad, alpha=-self.lr)

    def clip_gradients(self) -> torch.Tensor:
        """Scale each member's gradient as ``clip_grad_norm_`` would; returns the factors."""
        grads = self.buffer.grads
        rows = grads.numel() // SEGMENT
        squares = self._clip_squares
        self.grad_norms(grads, squares)
        total = squares.view(self.buffer.members, -1).sum(1).sqrt_().to(grads.dtype)
        coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
        grads.view(rows, SEGMENT).mul_(coef.index_select(0, self.grad_norms.owner)[:, None])
        return coef

    def update_squares(self, out: torch.Tensor) -> None:
        """The squared norms of each weight's update just made, into ``out``
        (``squares_dtype``), from ``update_source`` (with Adam, the difference to the
        ``snapshot`` that ``take_snapshot`` kept before the step)."""
        if self.snapshot is not None:
            torch.sub(self.buffer.params, self.snapshot, out=self.snapshot)
        self.update_norms(self.update_source, out)

    def take_snapshot(self) -> None:
        """Keep the weights before a recorded step whose update is known only as a difference."""
        if self.snapshot is not None:
            self.snapshot.copy_(self.buffer.params)
