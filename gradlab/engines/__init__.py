"""Optional fast training engines for ``build_mlp`` networks (``pip install 'gradlab[fast]'``).

The core (``gradlab.train``) imports an engine only when a run's config names it
(``RunConfig.engine``): ``fused`` is ``members.train_one``. The core imports nothing from here at
module import, and the engines use only the core's public names (those of ``gradlab.record``'s
package, ``gradlab.train.__all__``...). Modules:

* ``stacked``: ``StackedMLP``, members of one architecture trained in lockstep by a hand-written
  backward pass on one flat buffer, recording the same columns as ``GradientRecorder``; made of
  ``layout`` (the flat buffer, its blocks' norms, the per-batch views), ``optim`` (SGD, Adam and
  clipping on the buffer) and ``recording`` (the recorded rows, flushed to frames);
* ``act_kernels``: each activation's registry entry with the engine's kernels added (autograd's
  own aten backward and forward kernels into given buffers, and the numba code);
* ``fused``, ``sparse``, ``simd``: numba kernels for it on a CPU (the SGD update with the norms,
  the classifier layer in one pass, a first layer that skips zero pixels; a 16-float vector type);
* ``batches``: batches gathered ahead in a worker thread, into reused buffers;
* ``members``: the training loop (``train_members``, ``train_one``);
* ``ensemble``: the seeds of one configuration trained together, and ``gradlab sweep
  --ensemble``'s tasks, which ``gradlab.tasks.run_task`` and ``gradlab.sweep`` import only then;
* ``positives``: for ``GradientRecorder`` on any model, each unit's count of z > 0 in one pass
  (its relu-family f'), loaded on first use (``record.optional_kernel``); without numba the
  recorder runs PyTorch's ops, with the same records;
* ``squares``: for ``GradientRecorder``, the sums of squares of a row's float32 tensors in one
  call (its norms), loaded the same way; without numba the recorder accumulates in float64
  (the same norms to within 1e-6, not the same bits).
"""
