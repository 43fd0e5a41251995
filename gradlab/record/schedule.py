"""Which steps a recorder records: every N-th, a given set, or about 20 per decade."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

LOG_POINTS_PER_DECADE = 20


def recorded_steps(total_steps: int, log_every: int = 1, log_spaced: bool = False) -> np.ndarray:
    """The steps (0-based, ``< total_steps``) that a schedule records, sorted.

    ``log_every=N`` records steps 0, N, 2N, …; 0 records nothing. ``log_spaced`` records step 0
    and about 20 steps per decade (1, 2, …, 10, 11, 13, …), for long runs.
    """
    if log_every == 0 or total_steps <= 0:
        return np.zeros(0, dtype=np.int64)
    if not log_spaced:
        return np.arange(0, total_steps, log_every, dtype=np.int64)
    n = math.ceil(math.log10(total_steps) * LOG_POINTS_PER_DECADE) + 1
    grid = np.round(10 ** (np.arange(n) / LOG_POINTS_PER_DECADE)).astype(np.int64)
    steps = np.unique(np.concatenate([[0], grid]))
    return steps[steps < total_steps]


class Schedule:
    """The steps to record: an int N (every N-th step; 0: none) or the steps themselves."""

    def __init__(self, steps: Iterable[int] | int):
        self.every = steps if isinstance(steps, int) else None
        self.steps = frozenset() if self.every is not None else frozenset(map(int, steps))

    def __contains__(self, step: int) -> bool:
        if self.every is not None:
            return self.every > 0 and step % self.every == 0
        return step in self.steps
