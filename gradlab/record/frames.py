"""The tidy grads frame: one row per (step, layer), one column per recorded statistic (README,
"Recorded columns"). The engines make their frames here too, so every engine's records have one
shape."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..activations import Activation

COLUMNS = (
    "grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm", "update_ratio",
    "applied_update_ratio", "act_grad_mean", "saturated_frac", "dead_frac", "loss",
)


def grads_frame(steps, epoch: int, norms: np.ndarray, loss: np.ndarray, update: np.ndarray,
                act: np.ndarray, batch, widths: np.ndarray,
                activation: Activation | list[Activation | None], *,
                layer_names: list[str] | None = None, applied: np.ndarray | None = None,
                numel: np.ndarray | None = None) -> pd.DataFrame:
    """The tidy grads frame of one run from its host buffers (one row per step and layer).

    ``norms`` (rows, 4n): grad_output, grad_weight, grad_bias and weight norms, n layers each;
    ``loss`` (rows,); ``update`` (rows, n): ‖ΔW‖; ``act`` (rows, n, 3): sum f', saturated and
    dead counts; ``batch`` (rows,): batch sizes; ``widths`` (n,): each layer's units;
    ``activation``: the one after every layer but the last, or per layer (None: unknown, the f'
    columns stay empty). ``layer_names`` (n,): default ``fc0 …``, ``build_mlp``'s names;
    ``applied`` (rows, n): ‖W_after − W_before‖ (default: not recorded, empty); ``numel``
    (rows, n): elements of z per layer (default: batch × widths).
    """
    rows, n = len(steps), len(widths)
    if rows == 0:
        return empty_frame()
    if isinstance(activation, Activation):
        activation = [activation] * (n - 1) + [None]

    def per_layer(block: int) -> np.ndarray:
        return norms[:, block * n:(block + 1) * n]

    if numel is None:
        numel = np.asarray(batch, dtype=np.float64)[:, None] * widths  # elements of z
    known = np.array([a is not None for a in activation])
    saturating = np.array([a is not None and a.saturating for a in activation])
    relu_family = np.array([a is not None and a.relu_family for a in activation])
    names = layer_names if layer_names is not None else [f"fc{i}" for i in range(n)]
    if applied is None:
        applied = np.full((rows, n), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        act_mean = np.where(known, act[:, :, 0] / numel, np.nan)
        saturated = np.where(saturating, act[:, :, 1] / numel, np.nan)
        dead = np.where(relu_family, act[:, :, 2] / widths, np.nan)
        ratio = update / per_layer(3)
        applied_ratio = applied / per_layer(3)
    return pd.DataFrame({
        "step": np.repeat(np.asarray(steps, dtype=np.int64), n),
        "epoch": np.full(rows * n, epoch, dtype=np.int64),
        "layer": np.tile(np.arange(n, dtype=np.int64), rows),
        "layer_name": np.tile(np.asarray(names, dtype=object), rows),
        "grad_output_norm": per_layer(0).reshape(-1),
        "grad_weight_norm": per_layer(1).reshape(-1),
        "grad_bias_norm": per_layer(2).reshape(-1),
        "weight_norm": per_layer(3).reshape(-1),
        "update_ratio": ratio.reshape(-1),
        "applied_update_ratio": applied_ratio.reshape(-1),
        "act_grad_mean": act_mean.reshape(-1),
        "saturated_frac": saturated.reshape(-1),
        "dead_frac": dead.reshape(-1),
        "loss": np.repeat(np.asarray(loss, dtype=np.float64), n),
    })


def empty_frame() -> pd.DataFrame:
    """A grads frame with no rows but the right columns and dtypes."""
    frame = pd.DataFrame({"step": np.zeros(0, np.int64), "epoch": np.zeros(0, np.int64),
                          "layer": np.zeros(0, np.int64),
                          # a string dtype, so that even a file without rows says so
                          "layer_name": pd.array([], dtype="string")})
    for column in COLUMNS:
        frame[column] = np.zeros(0, np.float64)
    return frame
