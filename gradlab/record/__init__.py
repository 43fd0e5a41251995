"""The recorder: hooks on a model's layers that record per-layer gradient statistics.

Its parts, one idea a module:

=================  ===========================================================================
``recorder``       ``GradientRecorder``: the step protocol that ties the parts together
``hooks``          ``Hooks``: one lifecycle (register together, remove together) for every hook
``layers``         which modules are recorded, their names, the activation after each
``schedule``       which steps are recorded (``recorded_steps``)
``norms``          exact 2-norms of many tensors into a row buffer
``fprime``         f' statistics: sum of f', saturated and dead units
``layer_stats``    how they are collected per step (a plain MLP's chunks, or each call)
``passes``         which backward passes make a step's gradient (``watch``)
``updates``        ``update_ratio``'s numerator: a weight snapshot, or SGD's own direction
``buffers``        the device row buffers, taken to the host at a flush
``frames``         the tidy grads frame and its columns (what the engines import)
``dists``          ``DistributionRecorder``: quantiles and histograms, on the same hooks
``through_time``   ``TimeRecorder``: recurrent layers' ‖∂L/∂x_t‖, ‖∂L/∂y_t‖ per time step
``watcher``        ``gradlab.watch``: this recorder driven by PyTorch's own hooks
``traced``         the layers' hooks inside ``torch.compile``: no graph break, no recompile
=================  ===========================================================================

The statistics live in device buffers indexed by a host-side counter, so the step loop never waits
for the device; ``flush()`` copies them to the host once, at an epoch end, as tidy rows.
``gradlab.watch`` (``watcher.py``) drives this recorder from PyTorch's own hooks instead of calls.

Which layers: every ``nn.Linear`` by default, ``nn.Conv1d/2d`` or a name predicate on request
(``layers.select``). Each carries its qualified name (``layer_name``); ``layer`` numbers them by
their first call in the forward pass (modules never called come last, in registration order).
A module called several times in one step (a shared block, a tied layer) is one layer: its
calls are taken together as one larger batch - ``grad_output_norm`` is the norm of dL/dz over all
calls (the square root of the sum of their squared norms), the f' statistics pool every call's
z (a unit is dead when it is positive in no call), and its parameter columns are those of the
accumulated ``.grad``, the one the optimizer uses.

How each column is obtained (README, "Recorded columns"):

* ``grad_output_norm``: a forward hook on each layer registers a *tensor* hook on its output z,
  which receives dL/dz. (A module full backward hook would break in-place activations that
  overwrite z, and would need the first layer's input to require grad.) A tensor hook registered
  before an in-place op still receives the gradient w.r.t. the value before it. A layer whose
  forward hook never fires (``nn.MultiheadAttention`` calls ``F.linear`` on its ``out_proj``'s
  weights) has this column and its f' columns empty; its parameter columns are still recorded.
* ``grad_weight_norm`` / ``grad_bias_norm``: the ``.grad`` after accumulation and *before* any
  gradient clipping (read in ``after_backward()``, or by ``watch`` as each ``.grad`` is
  accumulated), so the records show the raw gradient.
* ``act_grad_mean``, ``saturated_frac``, ``dead_frac``: f' of the activation that follows the
  layer (``layers.layer_activations``: found from the model, given, or empty where unknown -
  never computed with a guessed function). In a plain ``Linear, act, Linear, …`` Sequential
  (``build_mlp``'s), f' of sigmoid, tanh and the relu family is a function of the activation's
  *output*, which is the next Linear's input: it is read there, and the statistics of a whole
  chunk of steps are taken at once. Elsewhere f'(z) is taken in the forward hook, before any
  in-place activation can overwrite z; for the relu family only each unit's count of z > 0
  is taken there (on a CPU with numba one pass over z, ``engines/positives.py``; else two),
  from which ``flush`` derives the three columns. The kernel only counts (NaN is not > 0,
  in both), so the records are the same bits with numba or without. Units: output features
  (Linear) or channels (Conv).
* ``update_ratio``: ‖ΔW‖ / ‖W‖ of the update the optimizer *intends*, ‖W‖ taken before the
  update (``weight_norm``), each weight with its own parameter group's settings (``updates``:
  a weight snapshot differenced after the step; for SGD, lr times the norm of the direction it
  applies, read from ``.grad`` as the optimizer sees it, so after clipping).
* ``applied_update_ratio`` (``applied_updates=True``; costs a weight copy per recorded step):
  ‖W_after − W_before‖ / ‖W_before‖ as actually stored in the weights' dtype.

Norms (``norms``) are within 1e-6 (relative) of the norm accumulated in float64, at any size
(tested up to 38.6M entries) and in any dtype, and exact down to the smallest positive float32
(a float32 square underflows below ~1e-19). On the CPU the contiguous float32 tensors of a row
are taken by one numba call (``engines/squares.py``: float32 squares summed in tiles of 512,
the tiles in float64); any other tensor, and every one without numba, accumulates in float64
(a tensor above 1M entries: float32 norms of 64-entry pieces summed in float64). Other devices
accumulate every norm in float64 (MPS, without float64: scaled by the largest entry first, as
LAPACK's nrm2 does). The buffers hold float64.

Under ``torch.amp.GradScaler`` the recorder given the scaler (``scaler=``) divides dL/dz and the
gradients by its scale, so the records are those of the real loss; without it they are those of
the *scaled* loss. A step the scaler skips is not an optimizer step.

Under ``torch.compile`` (a compiled model given, or its layers' hooks traced by dynamo) the
forward hook does only what a graph holds (``traced``): z kept as a graph output, its f'
statistics taken eagerly as the backward pass ends, and dL/dz passed through an identity whose
backward gives a per-layer 0-d leaf the sum of squares of dL/dz. The layers' hooks then stay
registered between recorded steps (dynamo does not guard on hooks; it guards on the recorder's
state instead): one graph for recorded steps, one for the others, no graph break
(``tests/test_compiled.py``).

Cost. Per recorded step the device work is one norm call over dL/dz, the gradients and the
weights (taken as the backward pass ends, or in ``after_backward``) written into the row
buffer (on the CPU through its numpy view), and the f' passes above; the layers' hooks are
registered only while steps are recorded, so unrecorded steps run without them.
"""

from __future__ import annotations

from ..activations import SATURATION
from .dists import DistributionRecorder, empty_dists
from .fprime import (
                     CHUNK_BYTES,
                     activation_stats,
                     derivative_into,
                     hidden_segments,
                     optional_kernel,
                     per_unit_sum,
                     relu_family_stats,
)
from .frames import COLUMNS, empty_frame, grads_frame
from .hooks import Hooks
from .layers import select
from .norms import exact_norms, norms_into
from .recorder import GradientRecorder
from .schedule import recorded_steps
from .through_time import TimeRecorder
from .watcher import Watch, watch

USE_KERNELS = True  # False: PyTorch ops only, never the optional numba kernels (tests compare)

__all__ = [
    "CHUNK_BYTES", "COLUMNS", "SATURATION", "USE_KERNELS", "DistributionRecorder",
    "GradientRecorder", "Hooks", "TimeRecorder",
    "Watch", "activation_stats", "derivative_into", "empty_dists", "empty_frame", "exact_norms",
    "grads_frame", "hidden_segments", "norms_into", "optional_kernel", "per_unit_sum",
    "recorded_steps", "relu_family_stats", "select", "watch",
]
