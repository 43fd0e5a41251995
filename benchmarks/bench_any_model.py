"""The cost of ``gradlab.watch`` on models that are not MLPs (issue 14): a small CNN trained on
MNIST, and a Transformer encoder layer with a head on random tokens, each by a plain PyTorch
loop: unrecorded, with ``gradlab.watch`` recording every step, every 10th and every 100th, and
with ``wandb.watch(model, log="gradients", log_freq=N)`` in offline mode at the same frequencies.

(A) Each measurement is ``--steps`` steps of the same batches from the same initial weights,
timed as wall and process CPU seconds (including ``rec.flush()``, the records' way to the host);
the variants are interleaved (their order rotated each repetition) and each ratio is taken
against the unrecorded loop of the same repetition, then summarised as the median (min–max).
wandb writes its histograms from a separate service process, whose CPU time is not in this
process's: the wall-time ratio is the fair comparison with it. (B) One model trained in blocks
of 10 steps, plain and under the two watches in turn (``blocks``): the steadier figure on a
shared machine.

    pip install -e .[bench]     # wandb, for this script only
    python benchmarks/bench_any_model.py --data-dir ../shared/data [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


class EncoderBlock(nn.Module):
    """The issue's other model: a Transformer encoder layer on random tokens, and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(1000, 64)
        self.enc = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(tokens)).mean(1))


def token_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 1000, (32, 32), generator=g), torch.randint(0, 10, (32,),
                                                                          generator=g))
            for _ in range(steps)]


def loop(model: nn.Module, optimizer, batches) -> None:
    """The user's training loop, the same for every variant."""
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@dataclass(frozen=True)
class Subject:
    """A model the benchmark trains: how to make it (and its optimizer) afresh, its batches, the
    options ``watch`` needs for it, and one line saying what it is."""

    name: str
    make: Callable[[], nn.Module]
    batches: list
    options: dict
    about: str
    fprime: bool = True  # whether some layer's activation is known (its f' columns filled)

    def fresh(self):
        model = self.make()
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def plain(subject: Subject) -> common.Timing:
    model, optimizer = subject.fresh()
    timing, _ = common.timed(lambda: loop(model, optimizer, subject.batches))
    return timing


def with_gradlab(subject: Subject, log_every: int) -> common.Timing:
    model, optimizer = subject.fresh()

    def run():
        with gradlab.watch(model, optimizer, log_every=log_every, **subject.options) as rec:
            loop(model, optimizer, subject.batches)
        return rec.flush()

    timing, frame = common.timed(run)
    assert frame["grad_weight_norm"].notna().all()
    assert frame["act_grad_mean"].notna().any() or not subject.fprime
    return timing


def with_wandb(subject: Subject, log_freq: int) -> common.Timing:
    import wandb

    model, optimizer = subject.fresh()

    def run():
        wandb.watch(model, log="gradients", log_freq=log_freq)
        loop(model, optimizer, subject.batches)
        wandb.unwatch(model)

    timing, _ = common.timed(run)
    return timing


def blocks(subject: Subject, rounds: int) -> dict[str, list[float]]:
    """(B): one model and optimizer trained in blocks of ``BLOCK`` steps that rotate among the
    plain loop, a ``watch`` recording every step and a ``watch`` recording every 10th (one
    recorded step per block: the watches are kept and entered once per block, so their step
    counts continue); each block timed in process CPU µs per step. Within one round the blocks
    run back to back, so a slow spell of the machine touches all of them alike."""
    model, optimizer = subject.fresh()
    batches = subject.batches
    watches = {f"gradlab.watch, every {n}": gradlab.watch(model, optimizer, log_every=n,
                                                          **subject.options) for n in (1, 10)}
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


def blocks_table(times: dict[str, list[float]], over_out: dict[str, float]) -> str:
    """(B)'s table: each kind's CPU µs per step and its overhead against the plain block of the
    same round (medians written into ``over_out``)."""
    baseline = times["unrecorded"]
    rows = [["unrecorded", common.summary(baseline, "{:.0f}"), "—"]]
    for kind, ts in times.items():
        if kind != "unrecorded":
            over = [100 * (t / p - 1) for t, p in zip(ts, baseline, strict=True)]
            over_out[kind] = statistics.median(over)
            rows.append([kind, common.summary(ts, "{:.0f}"), f"{over_out[kind]:+.1f}"])
    return common.markdown_table(
        ["blocks of 10 steps", "µs/step (CPU)", "overhead % (median of the rounds)"], rows)


def mnist_batches(data_dir: str, steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_data("mnist", data_dir, device=torch.device("cpu"), train_size=steps * batch)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    x = data.train.x.view(-1, 1, 28, 28)
    return [(x[i], data.train.y[i]) for i in order.split(batch)][:steps]


def lstm_modules() -> tuple:
    """The LSTM and the decoder where gradlab records recurrent layers; else the decoder."""
    from gradlab.record.layers import UNIT_AXIS

    return (nn.LSTM, nn.Linear) if nn.LSTM in UNIT_AXIS else (nn.Linear,)


def subjects(args) -> list[Subject]:
    from real_models import GPT, LSTMLanguageModel, gpt_activations, lm_batches

    chosen = [
        Subject("cnn", make_cnn, mnist_batches(args.data_dir, args.steps, 64),
                {"modules": (nn.Conv2d, nn.Linear)},
                "A small CNN (Conv2d 1→8, 3×3, ReLU, max-pool; Conv2d 8→16, 3×3, ReLU, "
                "max-pool; Linear 400→64, ReLU; Linear 64→10; 26,000 parameters) on MNIST "
                "batches of 64; `gradlab.watch` records the 2 Conv2d and 2 Linear layers (f′ "
                "from the ReLUs found in the Sequential)"),
        Subject("transformer block", EncoderBlock, token_batches(args.steps),
                {"activations": {"enc.linear1": "relu"}},
                "The issue's other model: a `TransformerEncoderLayer(64, 4, 256)` (no dropout) "
                "after a 1,000-token embedding, mean-pooled into a Linear head, on random "
                "tokens (batches of 32 sequences of 32); `gradlab.watch` records linear1, "
                "linear2, the head and `out_proj` (whose hooks never fire: its dL/dz and f′ "
                "stay empty), f′ of linear1 given as relu"),
        Subject("gpt", GPT, lm_batches(args.steps), {"activations": gpt_activations()},
                "A GPT in nanoGPT's shape (4 blocks, d_model 128, 4 heads, 512-token "
                "vocabulary, context 64, batches of 16; `benchmarks/real_models.py`); "
                "`gradlab.watch` records its 17 Linear layers, f′ of each `c_fc` given as gelu"),
        Subject("lstm lm", LSTMLanguageModel, lm_batches(args.steps),
                {"modules": lstm_modules()},
                "An LSTM language model (embedding 128, LSTM 256, decoder to a 512-token "
                "vocabulary, sequences of 64, batches of 16); `gradlab.watch` records the LSTM "
                "(where recurrent layers are recordable) and the decoder", fprime=False),
    ]
    return [s for s in chosen if not args.models or s.name in args.models]


def measure(subject: Subject, args) -> tuple[str, list[str]]:
    """(A) and (B) for one model: its Markdown and its verdict lines."""
    variants = {"unrecorded": partial(plain, subject)}
    for n in FREQUENCIES:
        variants[f"gradlab.watch, every {n}"] = partial(with_gradlab, subject, n)
        variants[f"wandb.watch, log_freq={n}"] = partial(with_wandb, subject, n)
    for run_once in variants.values():  # warm up: allocator, first-call dispatch
        run_once()
    print(f"{subject.name}: {args.steps} steps per measurement")
    times = common.interleaved(variants, args.reps)
    block_over: dict[str, float] = {}
    block_table = blocks_table(blocks(subject, args.rounds), block_over)
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
    verdicts = []
    for n, target in ((1, 10.0), (10, 2.0)):
        ours = medians[f"gradlab.watch, every {n}", "wall"]
        theirs = medians[f"wandb.watch, log_freq={n}", "wall"]
        paired = block_over[f"gradlab.watch, every {n}"]
        verdicts.append(
            f"{subject.name}, every {n}: gradlab.watch {paired:+.1f} % in (B), {ours:+.1f} % "
            f"(A, wall; CPU {medians[f'gradlab.watch, every {n}', 'cpu']:+.1f} %), target "
            f"<= {target:.0f} %: {'met' if paired <= target else 'missed'}; wandb.watch "
            f"{theirs:+.1f} % (A): gradlab {'ahead' if ours < theirs else 'behind'}")
    text = (f"### {subject.name}\n\n{subject.about}.\n\n(A) whole loops:\n\n{table}\n\n"
            f"(B) {args.rounds} rounds of blocks of {BLOCK} steps of one model, the plain loop "
            f"and the two watches in turn:\n\n{block_table}")
    return text, verdicts


def run(args) -> str:
    threads = common.set_threads(args.threads)
    facts = common.machine()
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    folder = tempfile.mkdtemp(prefix="bench-wandb-")
    wandb.init(mode="offline", dir=folder, project="gradlab-bench")
    parts, verdicts = [], []
    for subject in subjects(args):
        text, lines = measure(subject, args)
        parts.append(text)
        verdicts += lines
    wandb.finish()
    body = (f"SGD lr 0.05 momentum 0.9, threads {threads}, {args.steps} steps per measurement, "
            f"{args.reps} interleaved repetitions, median (min–max); overhead against the "
            f"unrecorded loop of the same repetition (A) or round (B). `gradlab.watch` records "
            f"every column; `wandb.watch(log=\"gradients\")` histograms every parameter's "
            f"gradient (offline mode; its service process's CPU is not in the CPU column). The "
            f"machine is shared and noisy: compare ratios, not absolute times.\n\n"
            + "\n\n".join(parts) + "\n\n" + "\n".join(f"- {v}" for v in verdicts))
    return common.section("Recording any model: gradlab.watch against wandb.watch (issue 14)",
                          common.command_line(), facts, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100, help="rounds of (B)")
    parser.add_argument("--models", nargs="*", default=None,
                        help="which models (default: all): cnn, 'transformer block', gpt, "
                             "'lstm lm'")
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        common.write_section("bench_any_model", text)


if __name__ == "__main__":
    main()
