"""Arithmetic efficiency of training (issue 7, target 3): achieved GFLOP/s as a fraction of this
machine's fp32 matmul peak, measured in the same process with the same threads.

Achieved GFLOP/s = 6 x parameters x examples / seconds of the step loop (the usual 6N rule:
forward 2N, backward 4N per example), for the tutorial net (784-128-256-10) and a 5 x 1000 net
(784-1000-1000-1000-1000-10), batch 64, recording off and every step. The step loop's seconds are
``train()``'s own per-epoch training time (no evaluation, no setup). Note that the 6N rule counts
the gradient with respect to the input images, which training never computes: the executed
arithmetic is 6N - 2 x 784 x width₁ per example, and with the fused engine on MNIST the first
layer's two products run over the nonzero pixels only (``gradlab.sparse``, 19 % of them), so its
6N figure is a dense-equivalent rate that can pass the peak; the executed fraction counts what
ran. Peak = a 2048 x 2048 fp32 ``torch.mm`` repeated, interleaved with the training measurements.

    python benchmarks/bench_flops.py --data-dir ../shared/data [--write]
"""

from __future__ import annotations

import argparse
import statistics

import common
import torch

from gradlab.config import make_config
from gradlab.data import load_data
from gradlab.engines.batches import nonzero_fraction

NETS = {  # name: (widths, steps per measurement, target fraction of peak)
    "tutorial 784-128-256-10": ((128, 256), 300, 0.50),
    "5 x 1000": ((1000,) * 4, 24, 0.75),
}
PEAK_N = 2048


def parameters(widths, density: float = 1.0) -> tuple[int, int]:
    """6N's N, and the arithmetic executed per example: no input gradient, and the first
    layer's two products over the nonzero inputs only when ``density`` < 1 (gradlab.sparse)."""
    sizes = (784, *widths, 10)
    n = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    first = 2 * 784 * widths[0]
    return n, 6 * n - first - 2 * first * (1 - density)


def peak(device: torch.device, reps: int = 8) -> common.Timing:
    a = torch.randn(PEAK_N, PEAK_N, device=device)
    b = torch.randn(PEAK_N, PEAK_N, device=device)
    out = torch.empty(PEAK_N, PEAK_N, device=device)
    torch.mm(a, b, out=out)

    def run():
        for _ in range(reps):
            torch.mm(a, b, out=out)
    timing, _ = common.timed(run)
    flops = 2 * PEAK_N ** 3 * reps
    return common.Timing(flops / timing.wall / 1e9, flops / timing.cpu / 1e9)  # GFLOP/s


def training(data_dir: str, widths, steps: int, log_every: int, device: torch.device,
             path: str):
    config = make_config(depth=len(widths) + 1, widths=widths, activation="sigmoid", lr=0.01,
                         batch_size=64, epochs=1, log_every=log_every, train_size=steps * 64)
    data = load_data("mnist", data_dir, device=device, train_size=steps * 64)

    def measure() -> common.Timing:
        timing, result = common.timed(lambda: common.train_path(path, config, data, device))
        assert result.status == "complete", result.error
        loop = float(result.epochs.loc[result.epochs["split"] == "train", "seconds"].iloc[0])
        examples = steps * 64
        n, _ = parameters(widths)
        # GFLOP/s by the 6N rule; the loop's CPU time is its wall time here (one process)
        return common.Timing(6 * n * examples / loop / 1e9, 6 * n * examples / loop / 1e9)
    return measure


def run(args) -> str:
    threads = common.set_threads(args.threads)
    facts = common.machine()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 peak for an fp32 training
        devices.append(torch.device("cuda"))
    sections = []
    verdicts = []
    density = nonzero_fraction(load_data("mnist", args.data_dir).train.x)
    for device in devices:
        variants = {"peak (mm)": lambda d=device: peak(d)}
        for name, (widths, steps, _) in NETS.items():
            for path in common.PATHS:
                for log_every in (0, 1):
                    variants[f"{name}, {path}, log_every={log_every}"] = training(
                        args.data_dir, widths, steps, log_every, device, path)
        for measure in variants.values():  # warm up
            measure()
        print(f"{device}: threads {threads}")
        times = common.interleaved(variants, args.reps)
        peaks = [t.wall for t in times["peak (mm)"]]
        rows = [["fp32 peak: 2048² torch.mm", common.summary(peaks, "{:.1f}"), "—", "—"]]
        for name, (widths, _, target) in NETS.items():
            for path in common.PATHS:
                n, executed = parameters(widths, density if path == "fused" else 1.0)
                for log_every in (0, 1):
                    label = f"{name}, {path}, log_every={log_every}"
                    achieved = [t.wall for t in times[label]]
                    fraction = [a / p for a, p in zip(achieved, peaks, strict=True)]
                    rows.append([label, common.summary(achieved, "{:.1f}"),
                                 common.summary([100 * f for f in fraction], "{:.0f} %"),
                                 common.summary([100 * f * executed / (6 * n) for f in fraction],
                                                "{:.0f} %")])
                    if log_every == 0:
                        med = statistics.median(fraction)
                        verdict = "met" if med >= target else "missed"
                        verdicts.append(f"{device}, {name}, {path}: {100 * med:.0f} % of peak "
                                        f"(target >= {100 * target:.0f} %: {verdict})")
        table = common.markdown_table(
            ["what", "GFLOP/s (6N rule)", "fraction of peak", "executed fraction"], rows)
        sections.append(f"**{device}** ({facts.get('gpu', facts['cpu'])}, "
                        f"{threads} thread(s)):\n\n{table}")
    if len(devices) == 1:
        verdicts.append("No CUDA device here: the GPU rows were not run.")
    body = (f"Batch 64, sigmoid, SGD; {args.reps} interleaved repetitions, median (min–max). "
            f"{common.PATH_NOTE} Steps per measurement: "
            + ", ".join(f"{name} {steps}" for name, (_, steps, _) in NETS.items()) + ".\n\n"
            + "\n\n".join(sections) + "\n\n" + "\n".join(f"- {v}" for v in verdicts))
    return common.section("Arithmetic efficiency (issue 7)", common.command_line(), facts, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        gpu = "_gpu" if torch.cuda.is_available() and not args.no_gpu else ""  # its own section
        common.write_section(f"bench_flops_threads{args.threads}{gpu}", text)


if __name__ == "__main__":
    main()
