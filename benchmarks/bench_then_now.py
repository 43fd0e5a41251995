"""Recording cost then and now (issue 17: "recording must cost no more than today"): the code of
an earlier commit and today's, in one process, on the same batches, in interleaved blocks.

The earlier commit's ``gradlab`` package is extracted with ``git archive`` into a temporary
folder and imported as ``gradlab_then`` (its imports are all relative). Both recorders train the
tutorial net (784-128-256-10, sigmoid, batch 64, SGD lr 0.01) on MNIST:

* ``autograd``: one model and optimizer, ``GradientRecorder`` of then and of now both entered;
  blocks of 10 steps cycle through unrecorded, recorded by then, recorded by now, unrecorded,
  recorded by now, recorded by then (so neither recorder always follows the other). A block
  calls only its own recorder (an unrecorded block none), so each recorder's cost is that of
  recording every step against a loop without it, its every call counted;
* ``fused``: the stacked engine of then and of now (``StackedMLP``, one member each), each
  alternating recorded and unrecorded blocks.

Each block is timed in process CPU seconds; a recorded block's cost is its time less that of the
neighbouring unrecorded block(s) of the same code, and the figures are medians over the run. The
autograd verdict is the median of the paired differences: each "now" block less the "then" block
of the same three (blocks seconds apart, so the machine's load drifts out); its interval draws
whole runs, since a run's figures move together with where its model and buffers lie in
memory. On a shared machine, only these differences measured side by side mean anything.

    python benchmarks/bench_then_now.py --data-dir ../shared/data [--then 301208b] [--write]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
from torch.nn import functional as F

import gradlab
from gradlab.data import load_data
from gradlab.engines.batches import nonzero_fraction

BLOCK = 10
SIZES = (784, 128, 256, 10)


def import_then(commit: str):
    """The package ``gradlab`` of ``commit``, imported as ``gradlab_then``."""
    root = Path(gradlab.__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="gradlab-then-"))
    archive = folder / "then.tar"
    subprocess.run(["git", "-C", str(root), "archive", "-o", str(archive), commit, "gradlab"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    (folder / "gradlab").rename(folder / "gradlab_then")
    sys.path.insert(0, str(folder))
    return importlib.import_module("gradlab_then")


def batches(data_dir: str, steps: int):
    data = load_data("mnist", data_dir, device=torch.device("cpu"), train_size=steps * 64)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    return [(data.train.x[i], data.train.y[i]) for i in order.split(64)], \
        nonzero_fraction(data.train.x)


def autograd_blocks(then, steps: int, data) -> dict[str, list[float]]:
    """CPU µs per step of each block kind, one model, the two recorders side by side."""
    from gradlab.models import build_mlp
    from gradlab.record import GradientRecorder

    torch.manual_seed(0)
    model = build_mlp(SIZES, "sigmoid")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    kinds = ("not recorded", "recorded then", "recorded now")
    cycle = (0, 1, 2, 0, 2, 1)  # each three blocks: one of each kind, then and now alternating
    owner = [kinds[cycle[(s // BLOCK) % len(cycle)]] for s in range(steps)]
    then_steps = np.array([s for s in range(steps) if owner[s] == kinds[1]])
    now_steps = np.array([s for s in range(steps) if owner[s] == kinds[2]])
    times: dict[str, list[float]] = {k: [] for k in kinds}
    then_record = importlib.import_module(f"{then.__name__}.record")
    with then_record.GradientRecorder(model, "sigmoid", then_steps, optimizer=optimizer) as a, \
            GradientRecorder(model, "sigmoid", now_steps, optimizer=optimizer) as b:
        for start in range(0, steps, BLOCK):
            # a block runs only its own recorder's calls (none in an unrecorded block), so a
            # recorder's cost is its block less a step with no recorder at all; the other's
            # hooks are removed first, outside the timing
            for recorder in (a, b):
                recorder.begin_step(-1)
            calls = {kinds[1]: (a,), kinds[2]: (b,)}.get(owner[start], ())
            t0 = time.process_time()
            for step in range(start, start + BLOCK):
                x, y = data[step % len(data)]
                for recorder in calls:
                    recorder.begin_step(step)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                for recorder in calls:
                    recorder.after_backward(loss)
                optimizer.step()
                for recorder in calls:
                    recorder.after_update()
            times[owner[start]].append((time.process_time() - t0) / BLOCK * 1e6)
        a.flush()
        b.flush()
    return times


def fused_blocks(stacked_module, steps: int, data, density: float) -> dict[str, list[float]]:
    from gradlab.models import build_mlp

    torch.manual_seed(0)
    engine = stacked_module.StackedMLP([build_mlp(SIZES, "sigmoid")], "sigmoid", batch_size=64,
                                       lr=0.01, max_rows=steps, input_density=density)
    times: dict[str, list[float]] = {"not recorded": [], "recorded": []}
    for start in range(0, steps, BLOCK):
        record = (start // BLOCK) % 2 == 0
        t0 = time.process_time()
        for step in range(start, start + BLOCK):
            x, y = data[step % len(data)]
            engine.step(x[None], y[None], record)
        times["recorded" if record else "not recorded"].append(
            (time.process_time() - t0) / BLOCK * 1e6)
    return times


def extra(recorded: list[float], plain: list[float]) -> list[float]:
    """Each block of ``recorded`` less the block of ``plain`` at the same index, that is of the
    same cycle of blocks (µs per step)."""
    n = min(len(recorded), len(plain))
    return [r - p for r, p in zip(recorded[:n], plain[:n], strict=True)]


def flat(runs: list[list[float]]) -> list[float]:
    return [value for run in runs for value in run]


def difference_interval(now: list[list[float]], then: list[list[float]], draws: int = 2000
                        ) -> tuple[float, float]:
    """A 95 % bootstrap interval of median(now) − median(then) over runs' values, drawing whole
    runs (the same runs of both; see ``run_median_interval``)."""
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(draws):
        pick = rng.integers(0, len(now), len(now))
        diffs.append(np.median(np.concatenate([now[i] for i in pick]))
                     - np.median(np.concatenate([then[i] for i in pick])))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def run_median_interval(runs: list[list[float]], draws: int = 2000) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median of all ``runs``' values, drawing whole runs:
    each run has a new model and new buffers, whose placement in memory moves a run's
    figures as a whole (by tens of µs), so its values are not independent of each other."""
    rng = np.random.default_rng(0)
    medians = [np.median(np.concatenate([runs[i] for i in rng.integers(0, len(runs), len(runs))]))
               for _ in range(draws)]
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def run(args) -> str:
    threads = common.set_threads(args.threads)
    facts = common.machine()
    then = import_then(args.then)
    data, density = batches(args.data_dir, 50)
    from gradlab.engines import stacked as stacked_now
    try:  # (the stacked engine moved into engines/ after 7520b59)
        then_stacked = importlib.import_module("gradlab_then.engines.stacked")
    except ImportError:
        then_stacked = importlib.import_module("gradlab_then.stacked")
    for module in (then_stacked, stacked_now):  # compile the kernels outside the timing
        fused_blocks(module, 2 * BLOCK, data, density)
    autograd_blocks(then, 3 * BLOCK, data)
    rows, figures = [], {}
    for rep in range(args.reps):
        print(f"  rep {rep + 1}/{args.reps}")
        t = autograd_blocks(then, args.steps, data)
        for who in ("then", "now"):  # (per run: a run's figures move together)
            figures.setdefault(("autograd", who), []).append(
                extra(t[f"recorded {who}"], t["not recorded"]))
            figures.setdefault(("autograd", "plain"), []).append(t["not recorded"])
        figures.setdefault(("autograd", "paired"), []).append(  # same three blocks
            extra(t["recorded now"], t["recorded then"]))
        for who, module in (("then", then_stacked), ("now", stacked_now)):
            t = fused_blocks(module, args.steps, data, density)
            figures.setdefault(("fused", who), []).append(extra(t["recorded"], t["not recorded"]))
            figures.setdefault(("fused", f"plain {who}"), []).append(t["not recorded"])
    medians = {}
    for path in ("autograd", "fused"):
        for who in ("then", "now"):
            values = flat(figures[path, who])
            plain = flat(figures[path, "plain" if path == "autograd" else f"plain {who}"])
            medians[path, who] = statistics.median(values)
            rows.append([path, f"{who} ({args.then if who == 'then' else 'HEAD'})",
                         common.summary(plain, "{:.0f}"), f"{statistics.median(values):+.0f}",
                         f"{100 * statistics.median(values) / statistics.median(plain):+.1f}"])
    table = common.markdown_table(["path", "code", "µs/step unrecorded (CPU)",
                                   "µs more per recorded step (median)", "% of a step"], rows)
    verdicts = []
    for path in ("autograd", "fused"):
        low, high = difference_interval(figures[path, "now"], figures[path, "then"])
        verdicts.append(
            f"{path}: a recorded step costs {medians[path, 'now']:+.0f} µs now against "
            f"{medians[path, 'then']:+.0f} µs then (now/then "
            f"{medians[path, 'now'] / medians[path, 'then']:.2f}; now − then "
            f"{medians[path, 'now'] - medians[path, 'then']:+.0f} µs, 95 % bootstrap interval "
            f"{low:+.0f} to {high:+.0f} µs)")
    runs = figures["autograd", "paired"]
    paired = flat(runs)
    low, high = run_median_interval(runs)
    verdicts.append(
        f"autograd, paired (each now block less the then block beside it, {len(paired)} pairs "
        f"in {len(runs)} runs): now − then {statistics.median(paired):+.0f} µs per recorded "
        f"step, 95 % bootstrap interval {low:+.0f} to {high:+.0f} µs (drawing whole runs); "
        f"the runs' own medians {common.summary([statistics.median(r) for r in runs], '{:+.0f}')}")
    body = (f"Tutorial net 784-128-256-10, sigmoid, SGD lr 0.01, MNIST batches of 64; "
            f"{args.reps} runs of {args.steps} steps per path in blocks of {BLOCK}, threads "
            f"{threads}. Then: commit {args.then}; now: this checkout.\n\n{table}\n\n"
            + "\n".join(f"- {v}" for v in verdicts))
    return common.section("Recording cost, then and now (issue 17)", common.command_line(),
                          facts, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--then", default="301208b",
                        help="the earlier commit (301208b: the recorder before gradlab/record/)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        common.write_section("bench_then_now", text)


if __name__ == "__main__":
    main()
