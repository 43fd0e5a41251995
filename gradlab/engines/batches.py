"""Batches for the fused engine: gathered several steps at a time, the next group in a worker
thread, into reused buffers, with an optional per-group ``prepare`` hook (the sparse first
layer lists the nonzero pixels there). The core's training loop indexes its batches plainly."""

from __future__ import annotations

import os


def nonzero_fraction(x, limit: int = 1 << 20) -> float:
    """The fraction of nonzero entries among the first ``limit`` of a tensor (cheap): enough to
    tell a dataset of mostly background (MNIST: 0.19) from a dense one (standardized: 1.0)."""
    import torch

    flat = x.reshape(-1)[:limit]
    return int(torch.count_nonzero(flat)) / max(1, flat.numel())


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


PREFETCH_STEPS = 16  # steps whose batches are gathered together (3.2 MB for MNIST at batch 64)
FIRST_STEPS = 2  # in the first group: the caller waits for it, the worker gathers the next

_worker: tuple[int, object] | None = None  # (pid, executor): the gather thread, made once


def _gather_worker():
    """One thread for every ``gather_batches`` of this process, started on first use: a new
    thread costs milliseconds before its first gather (torch's per-thread setup). Made again in a
    forked child, which inherits the executor but not its thread."""
    from concurrent.futures import ThreadPoolExecutor

    global _worker
    if _worker is None or _worker[0] != os.getpid():
        _worker = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="gradlab-gather"))
    return _worker[1]


def gather_batches(x, y, indices: list, threaded: bool | None = None, prepare=None,
                   buffers: list | None = None):
    """Yield ``(x[index], y[index])`` for each index tensor of ``indices``, in order, shaped
    ``index.shape + x.shape[1:]``.

    Rows are gathered ``PREFETCH_STEPS`` steps at a time with one ``index_select``; on a CPU
    with a core that torch's threads leave free (``threaded`` None), the next group is gathered
    in a worker thread while the caller trains on this one (the first group, which the caller
    waits for, has only ``FIRST_STEPS``). Randomly ordered rows of a 188 MB array come from
    main memory, a wait that the second core then hides; the values are the same
    either way.

    ``prepare(rows, slot, shapes)``, if given, runs on each group's gathered rows (2-d: its
    steps' rows one after another, step j's ``index.shape`` being ``shapes[j]``) in the same
    thread, ``slot`` alternating 0, 1 (what it returns for a group may be reused two groups
    later); each step then yields ``(x, y, (prepared, j))``, j its place in the group.

    ``buffers``: two slots (``[None, None]`` at first; pass the same list again, e.g. each
    epoch) for the gathered x, used in turn and kept: no new memory per group, whose first touch
    costs page faults (more than the gather itself). A batch's x then stays valid only until the
    generator has moved two groups on: for loops that are done with a batch when they ask for
    the next.
    """
    import torch

    if threaded is None:  # only with a core to spare: OpenMP's threads spin on theirs
        threaded = x.device.type == "cpu" and torch.get_num_threads() < _cores()
    first = min(FIRST_STEPS, len(indices)) if threaded else 0
    groups = [indices[:first]] if first else []
    groups += [indices[i:i + PREFETCH_STEPS] for i in range(first, len(indices), PREFETCH_STEPS)]
    full = PREFETCH_STEPS * (indices[0].numel() if indices else 0)  # rows of a whole group

    def gather(k):
        flat = torch.cat([index.reshape(-1) for index in groups[k]])
        if buffers is None:
            gx = x.index_select(0, flat)
        else:
            buffer = buffers[k % 2]
            if buffer is None or len(buffer) < len(flat):
                buffer = buffers[k % 2] = x.new_empty((max(len(flat), full), *x.shape[1:]))
            gx = torch.index_select(x, 0, flat, out=buffer[:len(flat)])
        gy = y.index_select(0, flat)
        shapes = [tuple(index.shape) for index in groups[k]]
        return gx, gy, (prepare(gx, k % 2, shapes) if prepare is not None else None)

    def split(k, gx, gy, prepared):
        sizes = [index.numel() for index in groups[k]]
        for j, (index, bx, by) in enumerate(zip(groups[k], gx.split(sizes), gy.split(sizes),
                                                strict=True)):
            batch = bx.view(*index.shape, *x.shape[1:]), by.view(index.shape)
            yield batch if prepare is None else (*batch, (prepared, j))

    if not threaded:
        for k in range(len(groups)):
            yield from split(k, *gather(k))
        return
    pool = _gather_worker()
    pending = pool.submit(gather, 0) if groups else None
    try:
        for k in range(len(groups)):
            gathered = pending.result()
            if k + 1 < len(groups):
                pending = pool.submit(gather, k + 1)
            yield from split(k, *gathered)
    finally:  # the caller stopped early (an error, a break): nothing left running
        if pending is not None and not pending.cancel():
            pending.exception()
