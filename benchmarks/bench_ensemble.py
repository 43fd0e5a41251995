"""Vectorised ensembles (issue 7, target 4): six seeds of one configuration trained together with
``gradlab.ensemble.train_ensemble`` against the same six runs trained one after another with
``gradlab.train.train``, recording every step, and each member's records against its solo run.

Both sides do the whole runs: setup, training, flushing the records, and evaluating the 10,000 test
images each epoch. Throughput ratio = time(six solo runs) / time(ensemble), per repetition.

By default each run trains one whole epoch of the 60,000 training images, as a run of
``gradlab sweep`` does. ``--steps 300`` gives the shorter runs of earlier sessions, in which the
per-epoch evaluation and the setup weigh about three times as much against the training.

    python benchmarks/bench_ensemble.py --data-dir ../shared/data [--steps N] [--write]
"""

from __future__ import annotations

import argparse
import statistics

import common
import numpy as np
import torch

from gradlab.config import make_config
from gradlab.data import load_data
from gradlab.engines.ensemble import train_ensemble

TARGET = 3.0
SEEDS = (0, 1, 2, 3, 4, 5)


def largest_difference(ensemble, solo) -> float:
    """The largest relative difference between each member's records and its solo run's."""
    worst = 0.0
    for mine, theirs in zip(ensemble, solo, strict=True):
        for a, b in ((mine.grads.drop(columns=["step", "epoch", "layer"]),
                      theirs.grads.drop(columns=["step", "epoch", "layer"])),
                     (mine.epochs[["loss", "accuracy"]], theirs.epochs[["loss", "accuracy"]])):
            a, b = a.to_numpy(float), b.to_numpy(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
            worst = max(worst, float(np.nanmax(rel)) if rel.size else 0.0)
    return worst


def bench_device(device: torch.device, args, facts: dict, threads: int) -> tuple[str, str]:
    """The table and the verdict of one device."""
    train_size = args.steps * 64 if args.steps else None  # None: all 60,000
    data = load_data("mnist", args.data_dir, device=device, train_size=train_size)
    configs = [make_config(depth=3, widths=(128, 256), activation="sigmoid", lr=0.01,
                           batch_size=64, epochs=args.epochs, log_every=1, seed=seed,
                           train_size=train_size) for seed in SEEDS]
    last = {}

    def one_after_another(path: str):
        def measure():
            timing, results = common.timed(
                lambda: [common.train_path(path, c, data, device) for c in configs])
            last[path] = results
            return timing
        return measure

    def ensemble():
        timing, results = common.timed(lambda: train_ensemble(configs, data=data, device=device))
        last["ensemble"] = results
        return timing

    variants = {"6 runs one after another, autograd": one_after_another("autograd"),
                "6 runs one after another, fused": one_after_another("fused"),
                "ensemble of 6": ensemble}
    for measure in variants.values():  # warm up
        measure()
    print(f"{device}: threads {threads}")
    times = common.interleaved(variants, args.reps)
    base = times["6 runs one after another, autograd"]
    examples = len(SEEDS) * len(data.train) * args.epochs
    rows = []
    for name, ts in times.items():
        rows.append([name, common.summary([t.wall for t in ts], "{:.2f}"),
                     common.summary([t.cpu for t in ts], "{:.2f}"),
                     common.summary([examples / t.wall for t in ts], "{:.0f}"),
                     "—" if ts is base else
                     common.summary(common.ratios(base, ts, "wall"), "{:.2f}x") + " / "
                     + common.summary(common.ratios(base, ts, "cpu"), "{:.2f}x")])
    table = common.markdown_table(
        ["variant", "s (wall)", "s (CPU)", "training examples/s (wall)",
         "throughput vs one after another (wall / CPU)"], rows)
    med = statistics.median(common.ratios(base, times["ensemble of 6"], "wall"))
    engine = statistics.median(common.ratios(times["6 runs one after another, fused"],
                                             times["ensemble of 6"], "wall"))
    diff = largest_difference(last["ensemble"], last["autograd"])
    same = largest_difference(last["ensemble"], last["fused"])
    verdict = (f"{device}: {med:.2f}x the throughput of six `autograd` runs (target >= "
               f"{TARGET:.0f}x: {'met' if med >= TARGET else 'missed'}), {engine:.2f}x that of "
               f"six `fused` runs. Largest relative difference of any member's records "
               f"(every grads and epochs value) from its `autograd` run: {diff:.1e} (target "
               f"rtol ~1e-4: {'met' if diff <= 1e-4 else 'missed'}; the two backward passes "
               f"round differently); from its `fused` run: {same:.1e}")
    return (f"**{device}** ({facts.get('gpu', facts['cpu'])}, {threads} thread(s)):\n\n"
            f"{table}"), verdict


def describe_steps(steps: int) -> str:
    return (f"{steps} steps ({steps * 64:,} training images)" if steps else
            "938 steps (all 60,000 training images)")


def run(args) -> str:
    threads = common.set_threads(args.threads)
    facts = common.machine()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_gpu:
        devices.append(torch.device("cuda"))
    sections, verdicts = zip(*(bench_device(d, args, facts, threads) for d in devices),
                             strict=True)
    verdicts = list(verdicts)
    if len(devices) == 1:
        verdicts.append("No CUDA device here: the GPU rows were not run.")
    body = (f"Six seeds of the tutorial net (sigmoid 784-128-256-10, batch 64, SGD lr 0.01), "
            f"{args.epochs} epoch(s) of {describe_steps(args.steps)} recording every step, "
            f"plus the 10,000-image test evaluation per epoch; {args.reps} interleaved "
            f"repetitions, median (min–max). {common.PATH_NOTE}\n\n"
            + "\n\n".join(sections) + "\n\n" + "\n".join(f"- {v}" for v in verdicts))
    return common.section("Vectorised ensembles (issue 7)", common.command_line(), facts, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per epoch (batches of 64); 0: the whole training set, "
                             "938 steps, as a run of `gradlab sweep` trains")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        steps = f"_steps{args.steps}" if args.steps else ""
        gpu = "_gpu" if torch.cuda.is_available() and not args.no_gpu else ""  # its own section
        common.write_section(f"bench_ensemble_threads{args.threads}{steps}{gpu}", text)


if __name__ == "__main__":
    main()
