"""``gradlab.watch`` side by side with its peers (issue 32): Lightning's ``grad_norm(model, 2)``
logged each step, Cockpit's ``GradNorm`` on a BackPACK-extended model, ``wandb.watch(model,
log="gradients")`` (offline) and TensorBoard's ``SummaryWriter.add_histogram`` per parameter,
each recording every step and every 10th, on the tutorial MLP, a small CNN, a Transformer
encoder block, an LSTM classifier, and the MLP and the block under ``torch.compile``.

Each measurement trains a fresh copy of the model (same initial weights, same batches, SGD lr
0.05 momentum 0.9) for ``--steps`` steps (``--warm`` steps first, untimed, where compiled: they
hold the compilations), timed as wall seconds, ``rec.flush()`` / ``writer.close()`` included.
The monitors run in rotated order each repetition, and each is ratioed against the unmonitored
loop of the same repetition; the table gives the ratio of the minima over the repetitions and
the spread (min–max) of the per-repetition ratios. wandb runs in a process of its own, with
its own unmonitored loop (``wandb.init`` leaves threads that slow every later measurement in
its process). One torch thread.

    pip install -e .[bench]
    python benchmarks/bench_peers.py --data-dir ../shared/data [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import common
import torch
from bench_any_model import EncoderBlock, make_cnn, mnist_batches, token_batches
from torch import nn
from torch.nn import functional as F

import gradlab

FREQUENCIES = (1, 10)
MONITORS = ("gradlab", "lightning", "cockpit", "wandb", "tensorboard")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # (cpu: this process's only)
clock = CLOCKS["wall"]
TITLES = {"gradlab": "gradlab.watch", "lightning": "Lightning grad_norm",
          "cockpit": "Cockpit GradNorm", "wandb": "wandb.watch", "tensorboard": "TensorBoard"}


class TutorialMLP(nn.Module):
    """The PyTorch tutorial's network (``shared/bench/seed_tutorial.py``), sigmoid."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.flatten = nn.Flatten()
        self.hidden1 = nn.Linear(28 * 28, 128)
        self.hidden2 = nn.Linear(128, 256)
        self.out = nn.Linear(256, 10)

    def forward(self, x):
        x = torch.sigmoid(self.hidden1(self.flatten(x)))
        return self.out(torch.sigmoid(self.hidden2(x)))


class LSTMClassifier(nn.Module):
    """Embedding → LSTM(64, 128) → Linear on the last step's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(1000, 64)
        self.lstm = nn.LSTM(64, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


@dataclass(frozen=True)
class Subject:
    name: str
    make: Callable[[], nn.Module]
    batches: str  # "mnist" or "tokens"
    options: dict  # watch's
    compiled: bool = False


SUBJECTS = [
    Subject("tutorial MLP", TutorialMLP, "mnist",
            {"activations": {"hidden1": "sigmoid", "hidden2": "sigmoid"}}),
    Subject("small CNN", make_cnn, "mnist", {"modules": (nn.Conv2d, nn.Linear)}),
    Subject("transformer block", EncoderBlock, "tokens", {"activations": {"enc.linear1": "relu"}}),
    Subject("LSTM classifier", LSTMClassifier, "tokens", {"modules": (nn.LSTM, nn.Linear)}),
    Subject("tutorial MLP, compiled", TutorialMLP, "mnist",
            {"activations": {"hidden1": "sigmoid", "hidden2": "sigmoid"}}, compiled=True),
    Subject("transformer block, compiled", EncoderBlock, "tokens",
            {"activations": {"enc.linear1": "relu"}}, compiled=True),
]


def batches_for(subject: Subject, args) -> list:
    n = args.warm + args.steps
    if subject.batches == "mnist":
        return mnist_batches(args.data_dir, n, 64)
    return token_batches(n)


def measure(subject: Subject, batches: list, warm: int, monitor: str | None, every: int) -> float:
    """Wall seconds of the timed steps of one fresh model under ``monitor`` (None: none)."""
    model = subject.make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = torch.compile(model) if subject.compiled else model
    loss_fn = nn.CrossEntropyLoss()
    after_backward = None  # (step) -> None, where the monitor is called by the loop
    backward_context = None  # (step, losses, loss) -> context around backward
    finish: Callable[[], object] = lambda: None  # noqa: E731
    stack = contextlib.ExitStack()
    if monitor == "gradlab":
        rec = stack.enter_context(gradlab.watch(run, optimizer, log_every=every,
                                                **subject.options))
        finish = rec.flush
    elif monitor == "lightning":
        from lightning.pytorch.utilities import grad_norm

        logged = []

        def after_backward(step):
            if step % every == 0:
                logged.append(grad_norm(model, 2))
    elif monitor == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tempfile.mkdtemp(prefix="bench-tb-"))
        named = list(model.named_parameters())

        def after_backward(step):
            if step % every == 0:
                for name, p in named:
                    writer.add_histogram(name, p.grad, step)
        finish = writer.close
    elif monitor == "cockpit":
        from backpack import extend
        from cockpit import Cockpit, quantities

        run = model = extend(model)
        loss_fn = extend(loss_fn)
        cockpit = Cockpit(list(model.parameters()),
                          quantities=[quantities.GradNorm(lambda s: s % every == 0)])

        def backward_context(step, logits, y, loss):
            losses = F.cross_entropy(logits, y, reduction="none")
            return cockpit(step, info={"batch_size": y.shape[0], "individual_losses": losses,
                                       "loss": loss, "optimizer": optimizer})
    elif monitor == "wandb":
        import wandb

        wandb.watch(model, log="gradients", log_freq=every)  # (its parameters' hooks)
        finish = lambda: wandb.unwatch(model)  # noqa: E731
    start = clock()
    with stack:
        for step, (x, y) in enumerate(batches):
            if step == warm:
                start = clock()
            optimizer.zero_grad()
            logits = run(x)
            loss = loss_fn(logits, y)
            if backward_context is not None:
                with backward_context(step, logits, y, loss):
                    loss.backward()
            else:
                loss.backward()
            if after_backward is not None:
                after_backward(step)
            optimizer.step()
        finish()
    return clock() - start


def variants(subject: Subject, monitors) -> list[tuple[str | None, int]]:
    out: list[tuple[str | None, int]] = [(None, 0)]
    for monitor in monitors:
        if monitor == "cockpit" and subject.compiled:
            continue  # (BackPACK's extended modules are not compiled)
        out += [(monitor, n) for n in FREQUENCIES]
    return out


def run_subjects(args, monitors) -> dict:
    """{subject: {variant: [seconds per repetition]}}, the variants in rotated order."""
    common.set_threads(args.threads)
    out = {}
    for subject in SUBJECTS:
        if args.models and subject.name not in args.models:
            continue
        batches = batches_for(subject, args)
        warm = args.warm if subject.compiled else 2
        chosen = variants(subject, monitors)
        times: dict[str, list[float]] = {f"{m}/{n}": [] for m, n in chosen}
        for monitor, n in chosen:  # warm-up: allocator, imports, first-call dispatch
            measure(subject, batches[:warm + 3], warm, monitor, n)
        for rep in range(args.reps):
            shift = rep % len(chosen)
            for monitor, n in chosen[shift:] + chosen[:shift]:
                times[f"{monitor}/{n}"].append(measure(subject, batches, warm, monitor, n))
            print(f"  {subject.name} rep {rep + 1}: " + ", ".join(
                f"{k} {v[-1] / args.steps * 1e3:.2f}ms" for k, v in times.items()),
                file=sys.stderr, flush=True)
        out[subject.name] = times
    return out


def wandb_child(args) -> dict:
    """The wandb measurements, in this process of their own."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = "offline"
    import wandb

    wandb.init(mode="offline", dir=tempfile.mkdtemp(prefix="bench-wandb-"),
               project="gradlab-bench")
    try:
        return run_subjects(args, ["wandb"])
    finally:
        wandb.finish()


def overhead(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """(ratio of the minima, lowest and highest per-repetition ratio) as overhead %."""
    per = [100 * (t / b - 1) for t, b in zip(times, base, strict=True)]
    return 100 * (min(times) / min(base) - 1), min(per), max(per)


def table(results: dict, args) -> tuple[str, dict]:
    rows, figures = [], {}
    for name, times in results.items():
        base = times["None/0"]
        row = [f"{name} ({min(base) / args.steps * 1e3:.2f} ms)"]
        for monitor in MONITORS:
            cells = []
            for n in FREQUENCIES:
                key = f"{monitor}/{n}"
                if key not in times:
                    cells.append("n/a")
                    continue
                own_base = times.get(f"None/0@{monitor}", base)
                over, low, high = overhead(times[key], own_base)
                figures[name, monitor, n] = over
                cells.append(f"{over:+.0f} % ({low:+.0f}…{high:+.0f})")
            row.append(" / ".join(cells))
        rows.append(row)
    header = ["model (unmonitored step)"] + [f"{TITLES[m]} 1 / 10" for m in MONITORS]
    return common.markdown_table(header, rows), figures


def verdicts(figures: dict) -> list[str]:
    lines = []
    for name in dict.fromkeys(k[0] for k in figures):
        ours10 = figures[name, "gradlab", 10]
        lines.append(f"{name}, every 10th: gradlab {ours10:+.1f} % (target <= 2 %: "
                     f"{'met' if ours10 <= 2 else 'missed'})")
        ours = figures[name, "gradlab", 1]
        parts = []
        for peer in ("wandb", "tensorboard", "cockpit"):
            theirs = figures.get((name, peer, 1))
            if theirs is not None:
                ok = ours * 3 <= theirs
                parts.append(f"{TITLES[peer]} {theirs:+.0f} % ({'met' if ok else 'missed'})")
        light = figures.get((name, "lightning", 1))
        if light is not None:
            parts.append(f"Lightning {light:+.0f} % ({'met' if ours <= light else 'missed'})")
        lines.append(f"{name}, every step: gradlab {ours:+.1f} % against " + ", ".join(parts))
    return lines


def profile(args) -> str:
    """Where a recorded step's time goes on the tutorial MLP recording every step, and its
    floor: the bytes a recorded step must read at this machine's bandwidth, plus one hook
    call per layer."""
    import functools

    import numpy as np

    from gradlab.record import layer_stats, recorder, updates

    common.set_threads(args.threads)
    subject = SUBJECTS[0]
    batches = mnist_batches(args.data_dir, args.steps, 64)
    spent: dict[str, float] = {}
    parts = {"norms (dL/dz, .grad, W: one kernel call)": (recorder, "norms_into"),
             "f' (per call)": (layer_stats.CallStats, "forward"),
             "f' (into the row)": (layer_stats.CallStats, "end_step"),
             "update ratio (plan, measure)": (updates.UpdateMeter, "measure"),
             "update ratio (begin)": (updates.UpdateMeter, "begin"),
             "buffers (row, steps) and hooks on": (recorder.GradientRecorder, "begin_step"),
             "buffers to the frame (flush)": (recorder.GradientRecorder, "flush")}

    def timed_part(label, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
        return inner

    originals = {label: getattr(owner, name) for label, (owner, name) in parts.items()}
    best_plain, best_watched, best_parts = np.inf, np.inf, {}
    for rep in range(args.reps + 1):
        plain = measure(subject, batches, 0, None, 1)
        for label, (owner, name) in parts.items():
            setattr(owner, name, timed_part(label, originals[label]))
        spent.clear()
        try:
            watched = measure(subject, batches, 0, "gradlab", 1)
        finally:
            for label, (owner, name) in parts.items():
                setattr(owner, name, originals[label])
        if rep == 0:
            continue  # (warm-up)
        best_plain = min(best_plain, plain)
        if watched < best_watched:
            best_watched, best_parts = watched, dict(spent)
    steps = len(batches)
    per = lambda t: t / steps * 1e6  # noqa: E731
    over = per(best_watched - best_plain)
    rows = [[label, f"{per(t):.0f}"] for label, t in sorted(best_parts.items(),
                                                          key=lambda kv: -kv[1])]
    rest = over - sum(per(t) for t in best_parts.values())
    rows.append(["hook dispatch and bookkeeping (the rest: forward, tensor, weight, optimizer "
                 "hooks, passes)", f"{rest:.0f}"])
    # the floor: dL/dz, every .grad, the weights, the update (momentum buffers) and the hidden
    # z for f', read once at this machine's bandwidth; one forward hook call per layer
    model = subject.make()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    params = sum(p.numel() for p in model.parameters())
    batch = batches[0][0].shape[0]
    z = batch * (128 + 256 + 10)
    hidden = batch * (128 + 256)
    floats = z + params + weights + weights + hidden
    data = np.ones(floats, np.float32)
    big = np.ones(64 << 20, np.float32)
    reads = {}
    for label, array in (("cache-resident", data), ("memory", big)):
        array.sum()
        t0 = time.perf_counter()
        loops = max(1, int(2e8 // array.nbytes))
        for _ in range(loops):
            array.sum()
        reads[label] = array.nbytes * loops / (time.perf_counter() - t0)
    layer = nn.Linear(4, 4)
    x = torch.ones(1, 4)
    def bare(k):
        t0 = time.perf_counter()
        for _ in range(k):
            layer(x)
        return time.perf_counter() - t0
    bare(1000)
    without = min(bare(20000) for _ in range(3))
    handle = layer.register_forward_hook(lambda m, i, o: None)
    with_hook = min(bare(20000) for _ in range(3))
    handle.remove()
    hook_us = (with_hook - without) / 20000 * 1e6
    layers = 3
    floor = {k: floats * 4 / bw * 1e6 + layers * hook_us for k, bw in reads.items()}
    table = common.markdown_table(["part of a recorded step", "µs per step"], rows)
    return (f"Tutorial MLP, batch 64, recording every step, {steps} steps, the best of "
            f"{args.reps} repetitions: unmonitored {per(best_plain):.0f} µs a step, watched "
            f"{per(best_watched):.0f} µs: {over:.0f} µs of recording a step "
            f"({100 * (best_watched / best_plain - 1):+.0f} %).\n\n{table}\n\n"
            f"The floor: a recorded step must read dL/dz ({z:,} floats), every .grad "
            f"({params:,}), the weights ({weights:,}), the update (the momentum buffers, "
            f"{weights:,}) and the hidden z for f′ ({hidden:,}): {floats * 4 / 1e6:.2f} MB; at "
            f"this machine's bandwidth for one thread ({reads['cache-resident'] / 1e9:.1f} GB/s "
            f"for that much, cache-resident; {reads['memory'] / 1e9:.1f} GB/s from memory) "
            f"plus {layers} forward hook calls of {hook_us:.2f} µs: "
            f"{floor['cache-resident']:.0f} µs (cache) to {floor['memory']:.0f} µs (memory). "
            f"The recorder costs {over / floor['cache-resident']:.1f}× / "
            f"{over / floor['memory']:.1f}× that floor.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warm", type=int, default=20, help="untimed steps (compiled models)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--monitors", nargs="*", default=list(MONITORS))
    parser.add_argument("--wandb-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall seconds, or this process's CPU seconds (wandb's service "
                             "process then uncounted)")
    parser.add_argument("--profile", action="store_true",
                        help="only the profile of a recorded step on the tutorial MLP")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.profile:
        text = profile(args)
        print(text)
        if args.write:
            common.write_section("bench_peers_profile", common.section(
                "Where a recorded step's time goes, and its floor (issue 32)",
                common.command_line(), common.machine(), text))
        return
    if args.wandb_child:
        print(json.dumps(wandb_child(args)))
        return
    here = [m for m in args.monitors if m != "wandb"]
    results = run_subjects(args, here)
    print(json.dumps(results), file=sys.stderr, flush=True)  # (kept, should wandb's fail)
    if "wandb" in args.monitors:
        command = [sys.executable, __file__, "--wandb-child", "--data-dir", args.data_dir,
                   "--steps", str(args.steps), "--warm", str(args.warm), "--reps",
                   str(args.reps), "--threads", str(args.threads), "--clock", args.clock]
        if args.models:
            command += ["--models", *args.models]
        child = json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE,
                                          text=True).stdout.strip().splitlines()[-1])
        for name, times in child.items():
            results[name]["wandb/1"] = times["wandb/1"]
            results[name]["wandb/10"] = times["wandb/10"]
            results[name]["None/0@wandb"] = times["None/0"]
    text, figures = table(results, args)
    body = (f"{args.clock} time, {args.steps} timed steps per measurement ({args.warm} "
            f"untimed first where compiled), {args.reps} repetitions in rotated order, one "
            f"torch thread. Each "
            f"cell: the overhead of recording every step / every 10th against the unmonitored "
            f"loop, as the ratio of the minima over the repetitions (the per-repetition "
            f"ratios' min…max in brackets). wandb: its own process and its own unmonitored "
            f"loop. n/a: not run (Cockpit's BackPACK on a compiled model).\n\n{text}\n\n"
            + "\n".join(f"- {v}" for v in verdicts(figures)))
    section = common.section("gradlab.watch against its peers (issue 32)",
                             common.command_line(), common.machine(), body)
    print(section)
    if args.write:
        common.write_section("bench_peers", section)


if __name__ == "__main__":
    main()
