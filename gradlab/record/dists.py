"""Distribution records: per layer, quantiles and a histogram of the activations, of ∂L/∂z and of
the weight-gradient entries, at a schedule of their own (``RunConfig.dist_every``).

Glorot & Bengio (2010) read saturation and the back-propagated signal from such distributions
(their Figs. 2-3 percentiles, 6-8 histograms); the recorder's norms cannot show them.
Everything is computed on the device and buffered; ``flush`` (at an epoch end) moves it to the
host as a tidy frame, one row per (step, layer, quantity, stat[, quantile or bin]):

=============  ================================================================================
column         meaning
=============  ================================================================================
``quantity``   ``activation`` (a hidden layer's output f(z), the next Linear's input),
               ``grad_output`` (∂L/∂z of the layer, per example and unit),
               ``grad_weight`` (the entries of ∂L/∂W, before any clipping)
``stat``       ``quantile`` (level in ``q``), ``mean``, ``std``, or ``count`` (a histogram bin
               ``[bin_lo, bin_hi)``; the last bin includes its upper edge)
``value``      the statistic
=============  ================================================================================

Each histogram spans its own tensor's finite range at that step (in 50 equal bins), so that a
layer whose values are a hundred times smaller than its neighbours' (vanishing gradients) is
still resolved; the layers of one step overlay on one axis as densities. Quantiles are
``torch.quantile``'s (linear interpolation) over all entries; a tensor larger than
``torch.quantile`` accepts is sampled with a fixed stride (deterministic).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn

from .hooks import Hooks
from .layers import RECURRENT, select

QUANTILES = (0.0, 0.01, 0.02, 0.16, 0.5, 0.84, 0.98, 0.99, 1.0)
BINS = 50
QUANTITIES = ("activation", "grad_output", "grad_weight")
MAX_QUANTILE_INPUT = 2**24  # torch.quantile's limit on its input's size
DIST_COLUMNS = ("step", "epoch", "layer", "layer_name", "quantity", "stat", "q", "bin_lo",
                "bin_hi", "value")
_MOMENTS = ("mean", "std")


def quantile_sample(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened, every k-th entry when it is larger than ``torch.quantile`` accepts."""
    x = x.reshape(-1)
    stride = math.ceil(x.numel() / MAX_QUANTILE_INPUT)
    return x[::stride] if stride > 1 else x


def histogram(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``x`` in ``bins`` equal bins over [lo, hi], as ``torch.histc`` bins them, but
    with the edges as device tensors (``histc`` takes Python floats: a host sync per call).
    Values outside [lo, hi] and NaN are not counted."""
    x = x.reshape(-1)
    inside = (x >= lo) & (x <= hi)
    index = ((x - lo) / (hi - lo) * bins).floor().clamp_(0, bins - 1)
    index = torch.where(inside, index, torch.zeros_like(index)).long()
    counts = torch.zeros(bins, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, index, inside.long())


def finite_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest finite entry of ``x`` (device tensors), widened to [lo, lo + 1]
    where they are equal (a histogram of one value)."""
    inf = torch.tensor(math.inf, device=x.device, dtype=x.dtype)
    lo = torch.where(x.isfinite(), x, inf).amin()
    hi = torch.where(x.isfinite(), x, -inf).amax()
    return lo, torch.where(hi > lo, hi, lo + 1)


def summary(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles at ``levels``, then mean and std (float64), of all entries of ``x``."""
    sample = quantile_sample(x.detach())
    quantiles = torch.quantile(sample.float(), levels)
    flat = x.detach().reshape(-1).double()
    return torch.cat([quantiles.double(), flat.mean()[None], flat.std()[None]])


class DistributionRecorder:
    """Record the distributions of ``model``'s layers (every ``nn.Linear`` by default) at
    ``steps``.

    Per step, like ``GradientRecorder`` (hooks only on recorded steps, removed on exit)::

        with DistributionRecorder(model, steps) as dists:
            dists.begin_step(step)      # before the forward pass
            ...forward, loss.backward()...
            dists.after_backward()      # before clipping and optimizer.step()
            frame = dists.flush(epoch)  # at an epoch end

    Args:
        model: any module; its recorded layers are numbered 0… in ``model.modules()`` order,
            and the activation of layer l is the input of layer l+1 (a plain MLP's f(z_l)).
        steps: the steps to record (``record.recorded_steps``).
        bins: histogram bins per (step, quantity).
        modules: which modules to record, as ``GradientRecorder`` takes it (``layers.select``).
    """

    def __init__(self, model: nn.Module, steps, *, bins: int = BINS, modules=None):
        named = select(model, modules)
        recurrent = [n for n, m in named if isinstance(m, RECURRENT)]
        if recurrent:
            raise ValueError(f"distributions of recurrent layers ({recurrent[0]}) are not "
                             f"recorded: choose other modules")
        self.names = [name for name, _ in named]
        self.linears = [m for _, m in named]
        self.steps = {int(s) for s in steps}
        self.bins = bins
        self._levels = torch.tensor(QUANTILES, device=self.linears[0].weight.device)
        self._hooks = Hooks.forward(self.linears, [partial(self._forward_hook, i)
                                                   for i in range(len(self.linears))])
        self._inputs: list[torch.Tensor | None] = []
        self._grad_out: list[torch.Tensor | None] = []
        self._step: int | None = None
        self._buffer: list[tuple] = []  # (step, stats, counts, edges, present) per step

    def __enter__(self) -> DistributionRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.off()

    def _forward_hook(self, index: int, module, inputs, z: torch.Tensor) -> None:
        self._inputs[index] = inputs[0].detach()
        if z.requires_grad:
            z.register_hook(partial(self._grad_hook, index))

    def _grad_hook(self, index: int, grad: torch.Tensor) -> None:
        self._grad_out[index] = grad

    def begin_step(self, step: int) -> bool:
        """Start step ``step``; returns whether its distributions are recorded."""
        self._step = step if step in self.steps else None
        if self._step is not None and not self._hooks.registered:
            n = len(self.linears)
            self._inputs, self._grad_out = [None] * n, [None] * n
            self._hooks.on()
        return self._step is not None

    @torch.no_grad()
    def after_backward(self) -> None:
        """Summarise this step's tensors (call after ``backward``, before clipping)."""
        if self._step is None:
            return
        self._hooks.off()
        n = len(self.linears)
        # activation of layer l = input of Linear l+1; the output layer has none
        per_quantity = [self._inputs[1:] + [None], self._grad_out,
                        [m.weight.grad for m in self.linears]]
        device = self._levels.device
        stats = torch.full((n, len(QUANTITIES), len(QUANTILES) + 2), math.nan,
                           dtype=torch.float64, device=device)
        counts = torch.zeros((n, len(QUANTITIES), self.bins), dtype=torch.int64,
                             device=device)
        edges = torch.full((n, len(QUANTITIES), 2), math.nan, dtype=torch.float64,
                           device=device)
        present = np.zeros((n, len(QUANTITIES)), dtype=bool)  # known on the host: no sync
        for k, tensors in enumerate(per_quantity):
            for i, t in enumerate(tensors):
                if t is None:
                    continue
                t = t.detach()
                lo, hi = finite_range(t)
                edges[i, k, 0], edges[i, k, 1] = lo, hi
                stats[i, k] = summary(t, self._levels)
                counts[i, k] = histogram(t, lo, hi, self.bins)
                present[i, k] = True
        self._buffer.append((self._step, stats, counts, edges, present))
        self._inputs, self._grad_out = [None] * n, [None] * n
        self._step = None

    def flush(self, epoch: int = 0) -> pd.DataFrame:
        """The buffered steps as a tidy frame (see the module docstring); empties the buffer."""
        buffer, self._buffer = self._buffer, []
        if not buffer:
            return empty_dists()
        steps = [s for s, *_ in buffer]
        stats = torch.stack([b[1] for b in buffer]).cpu().numpy()
        counts = torch.stack([b[2] for b in buffer]).cpu().numpy()
        edges = torch.stack([b[3] for b in buffer]).double().cpu().numpy()
        present = np.stack([b[4] for b in buffer])
        return dists_frame(steps, epoch, stats, counts, edges, present, self.names)


def dists_frame(steps, epoch, stats, counts, edges, present, names) -> pd.DataFrame:
    """Tidy rows from arrays of shape (steps, layers, quantities, stats|bins), the edges
    (steps, layers, quantities, 2) and which (step, layer, quantity) was recorded (``present``)."""
    n_steps, n_layers, n_q, n_stats = stats.shape
    labels = [("quantile", q) for q in QUANTILES] + [(m, math.nan) for m in _MOMENTS]
    frames = []
    for k, quantity in enumerate(QUANTITIES):
        index = pd.MultiIndex.from_product(
            [range(n_steps), range(n_layers), range(n_stats)], names=["s", "layer", "j"])
        part = pd.DataFrame({"value": stats[:, :, k, :].reshape(-1)}, index=index).reset_index()
        part["stat"] = [labels[j][0] for j in part["j"]]
        part["q"] = [labels[j][1] for j in part["j"]]
        part["bin_lo"] = part["bin_hi"] = math.nan
        bins = counts.shape[-1]
        index = pd.MultiIndex.from_product(
            [range(n_steps), range(n_layers), range(bins)], names=["s", "layer", "j"])
        hist = pd.DataFrame({"value": counts[:, :, k, :].reshape(-1).astype(np.float64)},
                            index=index).reset_index()
        lo = edges[hist["s"], hist["layer"], k, 0]
        hi = edges[hist["s"], hist["layer"], k, 1]
        width = (hi - lo) / bins
        hist["stat"], hist["q"] = "count", math.nan
        hist["bin_lo"] = lo + hist["j"] * width
        hist["bin_hi"] = np.where(hist["j"] == bins - 1, hi, lo + (hist["j"] + 1) * width)
        has = present[:, :, k]  # e.g. the output layer has no activation
        hist = hist[has[hist["s"], hist["layer"]] & np.isfinite(hist["bin_lo"])]
        part = part[has[part["s"], part["layer"]]]
        frames += [part.assign(quantity=quantity), hist.assign(quantity=quantity)]
    frame = pd.concat(frames, ignore_index=True)
    frame["step"] = np.asarray(steps, dtype=np.int64)[frame["s"]]
    frame["epoch"] = epoch
    frame["layer_name"] = np.asarray(names, dtype=object)[frame["layer"]]
    frame["layer"] = frame["layer"].astype(np.int64)
    frame = frame.sort_values(["step", "layer", "quantity", "stat", "q", "bin_lo"], kind="stable")
    return frame[list(DIST_COLUMNS)].reset_index(drop=True)


def empty_dists() -> pd.DataFrame:
    """A dists frame with no rows and the right columns and dtypes."""
    return pd.DataFrame({
        "step": pd.Series(dtype=np.int64), "epoch": pd.Series(dtype=np.int64),
        "layer": pd.Series(dtype=np.int64), "layer_name": pd.Series(dtype=object),
        "quantity": pd.Series(dtype=object), "stat": pd.Series(dtype=object),
        "q": pd.Series(dtype=np.float64), "bin_lo": pd.Series(dtype=np.float64),
        "bin_hi": pd.Series(dtype=np.float64), "value": pd.Series(dtype=np.float64)})
