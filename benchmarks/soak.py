"""Soak: a sweep of 50 short runs on real MNIST in a subprocess, its memory sampled throughout.

    python benchmarks/soak.py [--data-dir ../shared/data] [--jobs 2] [--out DIR]

Runs ``gradlab sweep`` (depths 2-6 × sigmoid, tanh, relu, gelu, elu × seeds 0, 1; 2000 training
examples, one epoch) and, every 0.5 s, sums the resident memory (VmRSS) of the sweep process and
all its descendants, read from /proc. Prints how many runs completed, the peak RSS in the first
and in the last 10 % of the time, and the total time. A leak shows as a last-10 % peak well above
the first one (the pool's workers live for the whole sweep). Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["--depths", "2,3,4,5,6", "--activations", "sigmoid,tanh,relu,gelu,elu",
        "--seeds", "0,1", "--train-sizes", "2000", "--epochs", "1"]
INTERVAL = 0.5


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children of each of its threads, recursively)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:  # the process ended meanwhile
                pass
    return found


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # ended, or a zombie


def sample(pid: int) -> tuple[int, int]:
    """Total RSS in KiB of ``pid`` and its descendants, and how many processes that is."""
    pids = descendants(pid)
    return sum(rss_kib(p) for p in pids), len(pids)


def peak(samples: list[tuple[float, int, int]], lo: float, hi: float) -> tuple[int, int]:
    """Largest RSS (KiB) among samples with lo <= t <= hi, and the process count then."""
    inside = [(rss, n) for t, rss, n in samples if lo <= t <= hi]
    return max(inside) if inside else (0, 0)


def count_statuses(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in (out / "runs").glob("*/status.json"):
        status = json.loads(path.read_text())["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("GRADLAB_DATA", "../shared/data"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder [default: a fresh temp dir]")
    parser.add_argument("--samples", default=None, help="write the samples to this CSV file")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="gradlab-soak-")) / "sweep"
    cmd = [sys.executable, "-m", "gradlab", "sweep", *GRID, "--jobs", str(args.jobs),
           "--data-dir", args.data_dir, "--out", str(out), "--device", "cpu"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: list[tuple[float, int, int]] = []
    while proc.poll() is None:
        rss, n = sample(proc.pid)
        if rss:
            samples.append((time.monotonic() - t0, rss, n))
        time.sleep(INTERVAL)
    stdout = proc.stdout.read()
    total = time.monotonic() - t0

    if args.samples:
        with open(args.samples, "w") as f:
            f.write("seconds,rss_kib,processes\n")
            f.writelines(f"{t:.2f},{rss},{n}\n" for t, rss, n in samples)
    counts = count_statuses(out)
    first, first_n = peak(samples, 0, 0.1 * total)
    last, last_n = peak(samples, 0.9 * total, total)
    overall, overall_n = peak(samples, 0, total)
    # the same while the pool's workers are alive (more than the sweep process itself): the
    # first 10 % has them importing, the last 10 % of all time only the summary
    pool = [t for t, _, n in samples if n > 1]
    span = (pool[-1] - pool[0]) if pool else 0.0
    pool_first, _ = peak([s for s in samples if s[2] > 1], pool[0], pool[0] + 0.1 * span) \
        if pool else (0, 0)
    pool_last, _ = peak([s for s in samples if s[2] > 1], pool[-1] - 0.1 * span, pool[-1]) \
        if pool else (0, 0)
    print(stdout.strip().splitlines()[-1] if stdout.strip() else "(no output)")
    print(f"exit status:          {proc.returncode}")
    print(f"runs complete:        {counts.get('complete', 0)} of 50 "
          f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    print(f"peak RSS, first 10 %: {first / 1024:.0f} MiB ({first_n} processes)")
    print(f"peak RSS, last 10 %:  {last / 1024:.0f} MiB ({last_n} processes)")
    print(f"peak RSS, overall:    {overall / 1024:.0f} MiB ({overall_n} processes)")
    if pool:
        print(f"with workers alive ({pool[0]:.0f}-{pool[-1]:.0f} s): peak RSS first 10 % "
              f"{pool_first / 1024:.0f} MiB, last 10 % {pool_last / 1024:.0f} MiB")
    print(f"total time:           {total:.1f} s ({len(samples)} samples every {INTERVAL} s)")
    print(f"results:              {out}")
    return 0 if counts.get("complete", 0) == 50 else 1


if __name__ == "__main__":
    sys.exit(main())
