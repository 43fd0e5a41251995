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



def is_compiling() -> bool:
    """Whether this code is being traced by ``torch.compile`` (dynamo), where it becomes a
    graph: ``torch.compiler.is_compiling`` (torch 2.3 and later; earlier: never)."""
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def uncompiled(model):
    """The module a ``torch.compile``d one wraps (``OptimizedModule._orig_mod``; hooks on it run
    as the compiled module calls it, its submodules' inside the graph), else ``model``: its
    layers keep the names they have in the model as written."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) and type(model).__name__ == (
        "OptimizedModule") else model



def forget_compiled(model) -> None:
    """Drop the graphs ``torch.compile`` made of ``model``'s forward, if any: dynamo does not
    guard on module hooks, so a graph traced before a recorder's hooks were registered (or with
    an earlier recorder's) would keep running without them. By the forward code objects' cache
    entries (private: ``reset_code``); where that is missing, every graph of the process
    (``torch.compiler.reset``), once one was made."""
    frames = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    entries = getattr(frames, "_debug_get_cache_entry_list", None)
    reset_code = getattr(frames, "reset_code", None)
    if entries is None or reset_code is None:
        counters = torch._dynamo.utils.counters
        if counters["stats"].get("unique_graphs"):
            torch.compiler.reset()
        return
    from torch._dynamo import external_utils

    codes = {type(m).forward.__code__ for m in model.modules()}
    codes.add(external_utils.wrap_inline(len).__code__)  # (how an nn.Sequential is compiled)
    for code in codes:
        if entries(code):
            reset_code(code)
