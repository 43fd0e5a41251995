"""Recorder overhead: ``gradlab.train.train`` with ``log_every`` 1 and 10 against the same loop with
recording off (``log_every=0``), tutorial net (784-128-256-10, sigmoid, batch 64) on MNIST.

(A) Each measurement is one whole ``train()`` call of ``--steps`` steps (one epoch of a training
subset), including the recorder's setup and its flush to a DataFrame; the test split is cut to
one batch so that evaluation costs nothing. Overhead = time(log_every=N) / time(log_every=0) - 1,
per repetition. On a shared machine these whole-run ratios are noisy, so (B) also measures the
cost of a recorded step directly: one long run of the training engine in which blocks of 10 steps
are recorded and not recorded in turn, timing each block (process CPU time); the overhead of
recording every step is the median over pairs of neighbouring blocks, and that of log_every=10
is a tenth of it (an unrecorded step does nothing for the recorder).

    python benchmarks/bench_recorder.py --data-dir ../shared/data [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

from gradlab.config import make_config
from gradlab.data import Data, Split, load_data
from gradlab.models import build_mlp
from gradlab.stacked import StackedMLP
from gradlab.train import resolve_device, train

SCHEDULES = (0, 1, 10)


def bench_data(data_dir: str, steps: int, batch: int, device: torch.device) -> Data:
    data = load_data("mnist", data_dir, device=device, train_size=steps * batch)
    return Data(train=data.train, test=Split(data.test.x[:batch], data.test.y[:batch]))


def windows(data: Data, steps: int, block: int = 10) -> tuple[list[float], list[float]]:
    """CPU µs per step of alternating recorded / unrecorded blocks of one engine run."""
    torch.manual_seed(0)
    model = build_mlp((784, 128, 256, 10), "sigmoid")
    engine = StackedMLP([model], "sigmoid", batch_size=64, lr=0.01, max_rows=steps)
    n = len(data.train)
    order = torch.randperm(n).split(64)
    recorded, plain = [], []
    for start in range(0, steps, block):
        record = (start // block) % 2 == 0
        t0 = time.process_time()
        for step in range(start, start + block):
            index = order[step % len(order)]
            x = data.train.x.index_select(0, index).unsqueeze(0)
            y = data.train.y.index_select(0, index).unsqueeze(0)
            engine.step(x, y, record)
        (recorded if record else plain).append((time.process_time() - t0) / block * 1e6)
    return recorded, plain


def run(args) -> str:
    threads = common.set_threads(args.threads)
    device = resolve_device(args.device)
    facts = common.machine()
    facts["device"] = str(device)
    data = bench_data(args.data_dir, args.steps, 64, device)

    def variant(log_every: int):
        config = make_config(depth=3, widths=(128, 256), activation=args.activation, lr=0.01,
                             batch_size=64, epochs=1, log_every=log_every,
                             train_size=args.steps * 64)

        def measure() -> common.Timing:
            timing, result = common.timed(lambda: train(config, data=data, device=device))
            assert result.status == "complete", result.error
            return timing
        return measure

    variants = {f"log_every={n}": variant(n) for n in SCHEDULES}
    for measure in variants.values():  # warm up: allocator, first-call dispatch
        measure()
    print(f"threads {threads}, device {device}, {args.steps} steps per measurement")
    times = common.interleaved(variants, args.reps)
    base = times["log_every=0"]
    rows = []
    for name, ts in times.items():
        row = [name,
               common.summary([t.wall / args.steps * 1e6 for t in ts], "{:.0f}"),
               common.summary([t.cpu / args.steps * 1e6 for t in ts], "{:.0f}")]
        if name == "log_every=0":
            row += ["—", "—"]
        else:
            row += [common.summary([100 * (r - 1) for r in common.ratios(ts, base, k)], "{:+.1f}")
                    for k in ("wall", "cpu")]
        rows.append(row)
    table = common.markdown_table(
        ["schedule", "µs/step wall", "µs/step CPU", "overhead % (wall)", "overhead % (CPU)"],
        rows)
    recorded, plain = windows(data, args.window_steps)
    pairs = [100 * (r / p - 1) for r, p in zip(recorded, plain, strict=False)]
    every = statistics.median(pairs)
    step_cost = statistics.median([r - p for r, p in zip(recorded, plain, strict=False)])
    window_table = common.markdown_table(
        ["blocks of 10 steps", "µs/step (CPU)", "overhead % of a step"],
        [["not recorded", common.summary(plain, "{:.0f}"), "—"],
         ["recorded", common.summary(recorded, "{:.0f}"), common.summary(pairs, "{:+.1f}")]])
    verdicts = []
    for n, target, estimate in ((1, 3.0, every), (10, 1.0, every / 10)):
        whole = 100 * (statistics.median(common.ratios(times[f"log_every={n}"], base, "cpu")) - 1)
        verdicts.append(f"log_every={n}: {estimate:+.1f} % (B), {whole:+.1f} % (A, CPU); "
                        f"target <= {target:.0f} %: {'met' if estimate <= target else 'missed'}")
    body = (f"Tutorial net 784-128-256-10, {args.activation}, batch 64.\n\n(A) whole "
            f"``train()`` runs of {args.steps} steps, {args.reps} interleaved repetitions, "
            f"median (min–max):\n\n{table}\n\n(B) one run of {args.window_steps} steps in "
            f"blocks of 10, recorded and not in turn ({len(pairs)} pairs), median (min–max); a "
            f"recorded step costs {step_cost:.0f} µs more:\n\n{window_table}\n\n"
            + "\n".join(f"- {v}" for v in verdicts))
    return common.section("Recorder overhead (issue 3)", common.command_line(), facts, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--window-steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--activation", default="sigmoid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        common.write_section("bench_recorder", text)


if __name__ == "__main__":
    main()
