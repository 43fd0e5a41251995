"""The user's own metrics of a watched run (``rec.log(loss=...)``): tidy rows ``step, split,
metric, value``, saved as the run's ``metrics.parquet``; a logged training ``loss`` also fills
the ``loss`` column of the step's gradient records."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import torch

METRIC_COLUMNS = ("step", "split", "metric", "value")


class Metrics:
    """Logged values, kept as they come (a 0-d tensor is read only when the rows are made, so
    logging one waits for no device)."""

    def __init__(self):
        self._rows: list[tuple[int, str, str, object]] = []

    def log(self, step: int, split: str, values: dict) -> None:
        if not isinstance(split, str) or not split:
            raise ValueError(f"split={split!r} is invalid: a name such as 'train' or 'test'")
        if not values:
            raise ValueError("log() got no values: give them as names, e.g. log(loss=0.3)")
        for metric, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{metric}: a tensor of {value.numel()} values is invalid: "
                                     f"log one number (e.g. loss.item() or loss.mean())")
                value = value.detach()
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{metric}={value!r} is invalid: log a number")
            self._rows.append((step, split, metric, value))

    def frame(self) -> pd.DataFrame:
        """The rows logged so far (``METRIC_COLUMNS``), in the order logged."""
        rows = self._rows
        return pd.DataFrame({
            "step": np.array([r[0] for r in rows], dtype=np.int64),
            "split": pd.array([r[1] for r in rows], dtype="string"),
            "metric": pd.array([r[2] for r in rows], dtype="string"),
            "value": np.array([float(r[3]) for r in rows], dtype=np.float64),
        })


def with_logged_loss(grads: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """``grads`` with its empty ``loss`` filled from the training ``loss`` logged at each step
    (the last one logged at a step)."""
    losses = metrics[(metrics["split"] == "train") & (metrics["metric"] == "loss")]
    if grads.empty or losses.empty:
        return grads
    by_step = losses.groupby("step")["value"].last()
    logged = grads["step"].map(by_step)
    out = grads.copy()
    out["loss"] = out["loss"].where(out["loss"].notna(), logged)
    return out

