"""Recorder overhead (issue 3): training with ``log_every`` 1 and 10 against the same loop with
recording off (``log_every=0``), tutorial net (784-128-256-10, sigmoid, batch 64) on MNIST, for
both ways gradlab trains a run (``common.PATHS``), and the cost of bare hooks.

(A) Each measurement is one whole run of ``--steps`` steps (one epoch of a training subset),
including the recorder's setup and its flush to a DataFrame; the test split is cut to one batch
so that evaluation costs nothing. Overhead = time(log_every=N) / time(log_every=0) - 1, per
repetition. On a shared machine these whole-run ratios are noisy, so (B) also measures the cost of
a recorded step directly: one long run in which blocks of 10 steps are recorded and not recorded in
turn, timing each block (process CPU time); the overhead of recording every step is the median
over pairs of neighbouring blocks, and that of log_every=10 is a tenth of it plus what the
schedule costs unrecorded steps (nothing: hooks are registered only while a step is recorded).

    python benchmarks/bench_recorder.py --data-dir ../shared/data [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import common
import numpy as np
import torch
from torch.nn import functional as F

from gradlab.config import make_config
from gradlab.data import Data, Split, load_data
from gradlab.engines.batches import nonzero_fraction
from gradlab.engines.stacked import StackedMLP
from gradlab.models import build_mlp
from gradlab.record import GradientRecorder
from gradlab.train import resolve_device

SCHEDULES = (0, 1, 10)
BLOCK = 10


def bench_data(data_dir: str, steps: int, batch: int, device: torch.device) -> Data:
    data = load_data("mnist", data_dir, device=device, train_size=steps * batch)
    return Data(train=data.train, test=Split(data.test.x[:batch], data.test.y[:batch]))


def engine_steps(steps: int, density: float = 1.0):
    """``step(x, y, record)`` of the stacked engine with one member (``--engine fused``), as
    ``train()`` makes it for inputs with this fraction of nonzeros."""
    torch.manual_seed(0)
    engine = StackedMLP([build_mlp((784, 128, 256, 10), "sigmoid")], "sigmoid", batch_size=64,
                        lr=0.01, max_rows=steps, input_density=density)
    return lambda step, x, y, record: engine.step(x[None], y[None], record)


def hook_floor_steps(steps: int):
    """``train()``'s step where a "recorded" step only has the hooks that catch dL/dz (a forward
    hook per Linear registering a tensor hook on its output, which stores the gradient) and
    computes nothing: the least any hook recorder of dL/dz costs."""
    torch.manual_seed(0)
    model = build_mlp((784, 128, 256, 10), "sigmoid")
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, foreach=True)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    caught = [None] * len(linears)

    def forward_hook(index, module, inputs, z):
        z.register_hook(lambda g: caught.__setitem__(index, g))

    handles = []

    def step(number, x, y, record):
        if record and not handles:  # as GradientRecorder: hooks only while steps are recorded
            handles.extend(m.register_forward_hook(partial(forward_hook, i))
                           for i, m in enumerate(linears))
        elif not record:
            while handles:
                handles.pop().remove()
        loss = F.cross_entropy(model(x), y)
        for p in params:
            p.grad = None
        loss.backward()
        optimizer.step()
    return step


def hook_steps(steps: int):
    """``step(x, y, record)`` as ``train()``'s loop makes it (autograd, torch.optim, hooks)."""
    torch.manual_seed(0)
    model = build_mlp((784, 128, 256, 10), "sigmoid")
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, foreach=True)
    schedule = np.array([s for s in range(steps) if (s // BLOCK) % 2 == 0])
    recorder = GradientRecorder(model, "sigmoid", schedule, optimizer=optimizer).__enter__()

    def step(number, x, y, record):
        recording = recorder.begin_step(number)
        assert recording == record
        loss = F.cross_entropy(model(x), y)
        for p in params:
            p.grad = None
        loss.backward()
        if recording:
            recorder.after_backward(loss)
        optimizer.step()
        if recording:
            recorder.after_update()
    return step


def windows(make, data: Data, steps: int) -> tuple[list[float], list[float]]:
    """CPU µs per step of alternating recorded / unrecorded blocks of one run."""
    step_fn = make(steps)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    order = order.split(64)
    recorded, plain = [], []
    for start in range(0, steps, BLOCK):
        record = (start // BLOCK) % 2 == 0
        t0 = time.process_time()
        for number in range(start, start + BLOCK):
            index = order[number % len(order)]
            step_fn(number, data.train.x.index_select(0, index),
                    data.train.y.index_select(0, index), record)
        (recorded if record else plain).append((time.process_time() - t0) / BLOCK * 1e6)
    return recorded, plain


def run(args) -> str:
    threads = common.set_threads(args.threads)
    device = resolve_device(args.device)
    facts = common.machine()
    facts["device"] = str(device)
    data = bench_data(args.data_dir, args.steps, 64, device)

    def variant(path: str, log_every: int):
        config = make_config(depth=3, widths=(128, 256), activation=args.activation, lr=0.01,
                             batch_size=64, epochs=1, log_every=log_every,
                             train_size=args.steps * 64)

        def measure() -> common.Timing:
            timing, result = common.timed(lambda: common.train_path(path, config, data, device))
            assert result.status == "complete", result.error
            return timing
        return measure

    variants = {f"{path}, log_every={n}": variant(path, n)
                for path in common.PATHS for n in SCHEDULES}
    for measure in variants.values():  # warm up: allocator, first-call dispatch
        measure()
    print(f"threads {threads}, device {device}, {args.steps} steps per measurement")
    times = common.interleaved(variants, args.reps)
    rows = []
    for name, ts in times.items():
        base = times[name.split(",")[0] + ", log_every=0"]
        row = [name,
               common.summary([t.wall / args.steps * 1e6 for t in ts], "{:.0f}"),
               common.summary([t.cpu / args.steps * 1e6 for t in ts], "{:.0f}")]
        if ts is base:
            row += ["—", "—"]
        else:
            row += [common.summary([100 * (r - 1) for r in common.ratios(ts, base, k)], "{:+.1f}")
                    for k in ("wall", "cpu")]
        rows.append(row)
    table = common.markdown_table(
        ["path, schedule", "µs/step wall", "µs/step CPU", "overhead % (wall)",
         "overhead % (CPU)"], rows)
    window_rows, verdicts = [], []
    makers = {"autograd": hook_steps,
              "fused": partial(engine_steps, density=nonzero_fraction(data.train.x)),
              "autograd, hooks that catch dL/dz only": hook_floor_steps}
    pairs_of = {}
    for path, make in makers.items():
        recorded, plain = windows(make, data, args.window_steps)
        pairs = [100 * (r / p - 1) for r, p in zip(recorded, plain, strict=False)]
        pairs_of[path] = pairs
        cost = statistics.median([r - p for r, p in zip(recorded, plain, strict=False)])
        window_rows += [[f"{path}, not recorded", common.summary(plain, "{:.0f}"), "—", "—"],
                        [f"{path}, recorded", common.summary(recorded, "{:.0f}"),
                         common.summary(pairs, "{:+.1f}"), f"{cost:.0f}"]]
    for path in common.PATHS:
        every = statistics.median(pairs_of[path])
        for n, target, estimate in ((1, 3.0, every), (10, 1.0, every / 10)):
            whole = statistics.median(common.ratios(times[f"{path}, log_every={n}"],
                                                    times[f"{path}, log_every=0"], "cpu"))
            verdicts.append(f"`{path}`, log_every={n}: {estimate:+.1f} % (B), "
                            f"{100 * (whole - 1):+.1f} % (A, CPU); target <= {target:.0f} %: "
                            f"{'met' if estimate <= target else 'missed'}")
    verdicts.append(f"hooks alone (dL/dz caught, nothing computed): "
                    f"{statistics.median(pairs_of['autograd, hooks that catch dL/dz only']):+.1f} "
                    f"% of a step (B): the floor of any hook recorder on this machine")
    window_table = common.markdown_table(
        ["blocks of 10 steps", "µs/step (CPU)", "overhead % of a step", "µs more per step"],
        window_rows)
    body = (f"Tutorial net 784-128-256-10, {args.activation}, batch 64. {common.PATH_NOTE}\n\n"
            f"(A) whole runs of {args.steps} steps, {args.reps} interleaved repetitions, median "
            f"(min–max):\n\n{table}\n\n(B) one run of {args.window_steps} steps per path in "
            f"blocks of 10, recorded and not in turn, median (min–max) over the blocks:\n\n"
            f"{window_table}\n\n" + "\n".join(f"- {v}" for v in verdicts))
    return common.section("Recorder overhead (issue 3)", common.command_line(), facts, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=937)  # a whole MNIST epoch of full batches
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--window-steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--activation", default="sigmoid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        device = "" if args.device == "cpu" else f"_{args.device}"  # its own section
        common.write_section(f"bench_recorder{device}", text)


if __name__ == "__main__":
    main()
