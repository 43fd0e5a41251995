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

GRID = ["--activations", "sigmoid,tanh,relu,gelu,elu", "--seeds", "0,1", "--train-sizes", "2000",
        "--epochs", "1"]
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


def is_worker(pid: int) -> bool:
    """Whether ``pid`` is a pool worker (not multiprocessing's resource tracker, not git)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def sample(pid: int) -> tuple[int, int, int]:
    """RSS in KiB of ``pid`` and all its descendants, RSS of the pool workers among them, and
    how many workers there are."""
    pids = descendants(pid)
    workers = [p for p in pids if is_worker(p)]
    return sum(rss_kib(p) for p in pids), sum(rss_kib(p) for p in workers), len(workers)


def peak(samples: list[tuple], lo: float, hi: float, column: int = 1) -> int:
    """Largest value of ``column`` (KiB) among samples with lo <= t <= hi."""
    return max((s[column] for s in samples if lo <= s[0] <= hi), default=0)


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
    parser.add_argument("--depths", default="2,3,4,5,6",
                        help="in sweep order: 6,5,4,3,2 trains the largest nets first, which "
                             "tells growth by net size from growth over time")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="gradlab-soak-")) / "sweep"
    cmd = [sys.executable, "-m", "gradlab", "sweep", "--depths", args.depths, *GRID, "--jobs",
           str(args.jobs), "--data-dir", args.data_dir, "--out", str(out), "--device", "cpu"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: list[tuple[float, int, int, int]] = []  # seconds, total, workers, n workers
    while proc.poll() is None:
        total_kib, workers_kib, n = sample(proc.pid)
        if total_kib:
            samples.append((time.monotonic() - t0, total_kib, workers_kib, n))
        time.sleep(INTERVAL)
    stdout = proc.stdout.read()
    total = time.monotonic() - t0

    if args.samples:
        with open(args.samples, "w") as f:
            f.write("seconds,rss_kib,workers_rss_kib,workers\n")
            f.writelines(",".join(map(str, s)) + "\n" for s in samples)
    counts = count_statuses(out)
    first, last = peak(samples, 0, 0.1 * total), peak(samples, 0.9 * total, total)
    # the pool's workers live for the whole sweep, so a leak shows as their memory growing while
    # they work; the last 10 % of all time is only the summary, with the workers gone
    busy = [s[0] for s in samples if s[3]]
    if busy:
        lo, hi = busy[0], busy[-1]
        w_first = peak(samples, lo, lo + 0.1 * (hi - lo), column=2)
        w_mid = peak(samples, lo + 0.45 * (hi - lo), lo + 0.55 * (hi - lo), column=2)
        w_last = peak(samples, hi - 0.1 * (hi - lo), hi, column=2)
    print(stdout.strip().splitlines()[-1] if stdout.strip() else "(no output)")
    print(f"exit status:          {proc.returncode}")
    print(f"runs complete:        {counts.get('complete', 0)} of 50 "
          f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    mib = 1 / 1024
    print(f"peak RSS, first 10 %: {first * mib:.0f} MiB (sweep process and all its children)")
    print(f"peak RSS, last 10 %:  {last * mib:.0f} MiB")
    print(f"peak RSS, overall:    {peak(samples, 0, total) * mib:.0f} MiB")
    if busy:
        print(f"pool workers ({max(s[3] for s in samples)}, alive {lo:.0f}-{hi:.0f} s): peak RSS "
              f"{w_first * mib:.0f} MiB in the first 10 % of that span (starting up), "
              f"{w_mid * mib:.0f} MiB around its middle, {w_last * mib:.0f} MiB in its last 10 %")
    print(f"total time:           {total:.1f} s ({len(samples)} samples every {INTERVAL} s)")
    print(f"results:              {out}")
    return 0 if counts.get("complete", 0) == sum(counts.values()) == 50 else 1


if __name__ == "__main__":
    sys.exit(main())
