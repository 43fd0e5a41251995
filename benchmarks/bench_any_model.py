"""The cost of ``gradlab.watch`` on a model that is not an MLP (issue 14): a small CNN trained on
MNIST by a plain PyTorch loop, unrecorded, with ``gradlab.watch`` recording every step, every 10th
and every 100th step (its Conv2d and Linear layers), and with ``wandb.watch(model,
log="gradients", log_freq=N)`` in offline mode at the same frequencies.

Each measurement is ``--steps`` steps of the same batches from the same initial weights, timed
as wall and process CPU seconds (including ``rec.flush()``, the records' way to the host); the
variants are interleaved (their order rotated each repetition) and each ratio is taken against
the unrecorded loop of the same repetition, then summarised as the median (min–max). wandb
writes its histograms from a separate service process, whose CPU time is not in this process's:
the wall-time ratio is the fair comparison with it.

    pip install -e .[bench]     # wandb, for this script only
    python benchmarks/bench_any_model.py --data-dir ../shared/data [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial

import common
import torch
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab.data import load_data

FREQUENCIES = (1, 10, 100)
BLOCK = 10


def make_cnn() -> nn.Module:
    """A small CNN of the kind a first PyTorch tutorial trains on MNIST."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10))


def loop(model: nn.Module, optimizer, batches) -> None:
    """The user's training loop, the same for every variant."""
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def fresh():
    model = make_cnn()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def plain(batches) -> common.Timing:
    model, optimizer = fresh()
    timing, _ = common.timed(lambda: loop(model, optimizer, batches))
    return timing


def with_gradlab(batches, log_every: int) -> common.Timing:
    model, optimizer = fresh()

    def run():
        with gradlab.watch(model, optimizer, log_every=log_every,
                           modules=(nn.Conv2d, nn.Linear)) as rec:
            loop(model, optimizer, batches)
        return rec.flush()

    timing, frame = common.timed(run)
    assert frame["grad_output_norm"].notna().all() and frame["act_grad_mean"].notna().any()
    return timing


def with_wandb(batches, log_freq: int) -> common.Timing:
    import wandb

    model, optimizer = fresh()

    def run():
        wandb.watch(model, log="gradients", log_freq=log_freq)
        loop(model, optimizer, batches)
        wandb.unwatch(model)

    timing, _ = common.timed(run)
    return timing


def blocks(batches, rounds: int) -> dict[str, list[float]]:
    """(B): one model and optimizer trained in blocks of ``BLOCK`` steps that rotate among the
    plain loop, a ``watch`` recording every step and a ``watch`` recording every 10th (one
    recorded step per block: the watches are kept and entered once per block, so their step
    counts continue); each block timed in process CPU µs per step. Within one round the blocks
    run back to back, so a slow spell of the machine touches all of them alike."""
    model, optimizer = fresh()
    watches = {f"gradlab.watch, every {n}": gradlab.watch(
        model, optimizer, log_every=n, modules=(nn.Conv2d, nn.Linear)) for n in (1, 10)}
    kinds = ["unrecorded", *watches]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    position = 0
    for round_ in range(rounds):
        shift = round_ % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            chunk = [batches[(position + i) % len(batches)] for i in range(BLOCK)]
            position += BLOCK
            context = watches.get(kind)
            t0 = time.process_time()
            if context is None:
                loop(model, optimizer, chunk)
            else:
                with context:
                    loop(model, optimizer, chunk)
            times[kind].append((time.process_time() - t0) / BLOCK * 1e6)
    for context in watches.values():
        context.flush()
    return times


def mnist_batches(data_dir: str, steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_data("mnist", data_dir, device=torch.device("cpu"), train_size=steps * batch)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    x = data.train.x.view(-1, 1, 28, 28)
    return [(x[i], data.train.y[i]) for i in order.split(batch)][:steps]


def run(args) -> str:
    threads = common.set_threads(args.threads)
    facts = common.machine()
    batches = mnist_batches(args.data_dir, args.steps, 64)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    folder = tempfile.mkdtemp(prefix="bench-wandb-")
    wandb.init(mode="offline", dir=folder, project="gradlab-bench")
    variants = {"unrecorded": partial(plain, batches)}
    for n in FREQUENCIES:
        variants[f"gradlab.watch, every {n}"] = partial(with_gradlab, batches, n)
        variants[f"wandb.watch, log_freq={n}"] = partial(with_wandb, batches, n)
    for measure in variants.values():  # warm up: allocator, first-call dispatch
        measure()
    print(f"threads {threads}, {args.steps} steps per measurement")
    block_times = blocks(batches, args.rounds)
    times = common.interleaved(variants, args.reps)
    wandb.finish()
    base = times["unrecorded"]
    rows, medians = [], {}
    for name, ts in times.items():
        row = [name, common.summary([t.wall / args.steps * 1e6 for t in ts], "{:.0f}"),
               common.summary([t.cpu / args.steps * 1e6 for t in ts], "{:.0f}")]
        if ts is base:
            row += ["—", "—"]
        else:
            for kind in ("wall", "cpu"):
                over = [100 * (r - 1) for r in common.ratios(ts, base, kind)]
                medians[name, kind] = statistics.median(over)
                row.append(common.summary(over, "{:+.1f}"))
        rows.append(row)
    table = common.markdown_table(["variant", "µs/step wall", "µs/step CPU",
                                   "overhead % (wall)", "overhead % (CPU)"], rows)
    baseline = block_times["unrecorded"]
    block_rows, block_over = [["unrecorded", common.summary(baseline, "{:.0f}"), "—"]], {}
    for kind, ts in block_times.items():
        if kind != "unrecorded":
            over = [100 * (t / p - 1) for t, p in zip(ts, baseline, strict=True)]
            block_over[kind] = statistics.median(over)
            block_rows.append([kind, common.summary(ts, "{:.0f}"),
                               f"{statistics.median(over):+.1f}"])
    block_table = common.markdown_table(
        ["blocks of 10 steps", "µs/step (CPU)", "overhead % (median of the rounds)"], block_rows)
    verdicts = []
    for n, target in ((1, 10.0), (10, 2.0)):
        ours = medians[f"gradlab.watch, every {n}", "wall"]
        theirs = medians[f"wandb.watch, log_freq={n}", "wall"]
        paired = block_over[f"gradlab.watch, every {n}"]
        verdicts.append(
            f"every {n}: gradlab.watch {paired:+.1f} % in (B), {ours:+.1f} % (A, wall; CPU "
            f"{medians[f'gradlab.watch, every {n}', 'cpu']:+.1f} %), target <= {target:.0f} %: "
            f"{'met' if paired <= target else 'missed'}; wandb.watch {theirs:+.1f} % (A): "
            f"gradlab {'ahead' if ours < theirs else 'behind'}")
    body = (f"A small CNN (Conv2d 1→8, 3×3, ReLU, max-pool; Conv2d 8→16, 3×3, ReLU, max-pool; "
            f"Linear 400→64, ReLU; Linear 64→10; 26,000 parameters), SGD lr 0.05 momentum 0.9, "
            f"MNIST batches of 64, {args.steps} steps per measurement, {args.reps} interleaved "
            f"repetitions, median (min–max); overhead against the unrecorded loop of the same "
            f"repetition. `gradlab.watch` records the 2 Conv2d and 2 Linear layers (every "
            f"column, f' from the ReLUs found in the Sequential); `wandb.watch(log=\"gradients\")` "
            f"histograms every parameter's gradient (offline mode; its service process's CPU is "
            f"not in the CPU column). The machine is shared and noisy: compare ratios, not "
            f"absolute times.\n\n(A) whole loops:\n\n{table}\n\n(B) {args.rounds} rounds of "
            f"blocks of {BLOCK} steps of one model, the plain loop and the two watches in turn "
            f"(see `blocks`); overhead against the plain block of the same round:\n\n"
            f"{block_table}\n\n" + "\n".join(f"- {v}" for v in verdicts))
    return common.section("Recording any model: gradlab.watch against wandb.watch (issue 14)",
                          common.command_line(), facts, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100, help="rounds of (B)")
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        common.write_section("bench_any_model", text)


if __name__ == "__main__":
    main()
