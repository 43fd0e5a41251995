"""The few PyTorch internals gradlab's core uses, each behind one function with a public fallback.

Private APIs can change between releases; here they are in one place, each tested
(``tests/test_compat.py``), so a new torch breaks at most this module and only in speed: every
function falls back to public operations when the private one is missing.
"""

from __future__ import annotations

import torch


def foreach_norm(tensors: list[torch.Tensor],
                 dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The 2-norm of each tensor, accumulated in ``dtype`` (None: the tensor's own): one fused
    call (``torch._foreach_norm``) where it exists (with ``dtype``: torch 2.4 and later)."""
    fused = getattr(torch, "_foreach_norm", None)
    if fused is not None:
        if dtype is None:
            return list(fused(tensors))
        try:
            return list(fused(tensors, 2, dtype=dtype))
        except TypeError:  # (no dtype argument in this torch)
            pass
    return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``t.copy_(s)`` for each pair, fused where torch has ``_foreach_copy_``."""
    fused = getattr(torch, "_foreach_copy_", None)
    if fused is not None:
        fused(targets, sources)
        return
    for t, s in zip(targets, sources, strict=True):
        t.copy_(s)


def foreach_sub(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """``x - y`` for each pair, fused where torch has ``_foreach_sub``."""
    fused = getattr(torch, "_foreach_sub", None)
    if fused is not None:
        return list(fused(a, b))
    return [x - y for x, y in zip(a, b, strict=True)]


def version(tensor: torch.Tensor) -> object:
    """A counter that changes whenever ``tensor`` is modified in place (autograd's own). Where
    torch does not expose it, a new object each call, equal to no earlier one: callers, which
    compare versions, then assume a change (re-measure, re-list) instead of wrongly trusting
    a stale value."""
    counter = getattr(tensor, "_version", None)
    return object() if counter is None else counter


def at_backward_end(callback) -> bool:
    """Run ``callback()`` once the backward pass now running has finished (autograd's final
    callbacks, as DistributedDataParallel uses them; call it from inside a hook of that pass).
    Returns False where torch has no such queue: the caller then reads later by other means."""
    engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None:
        return False
    queue(callback)
    return True

