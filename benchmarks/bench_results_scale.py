"""Reading results folders of many runs (issue 33): gradlab ls, gradlab.load(out).grads and a
resumed sweep's plan, summary and verdict, and gradlab report, beside DuckDB reading every
file of the same folder and pyarrow reading the same grads files. Seconds, min of --repeat,
each in a fresh process (whose peak memory is its ru_maxrss).

    python3 benchmarks/bench_results_scale.py --runs 1000,5000,20000 --root /tmp/scale

Folders are made once under --root (synthetic valid runs written through gradlab's own
writer, store.open_run / close_run: depth 3, 40 recorded steps each) and reused.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from gradlab import store
from gradlab.config import make_config

STEPS, DEPTH = 40, 3
GRAD_COLUMNS = ("grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm",
                "update_ratio", "applied_update_ratio", "act_grad_mean", "saturated_frac",
                "dead_frac", "loss")


def configs(n: int) -> list:
    """n distinct configs of a grid: seeds × learning rates."""
    return [make_config(depth=DEPTH, width=8, activation="sigmoid", seed=i % 1000,
                        lr=0.01 * (1 + i // 1000), epochs=1) for i in range(n)]


def write_runs(out: Path, grid: list) -> None:
    """Write the runs of ``grid`` into ``out`` (one worker's share of ``make_folder``)."""
    rng = np.random.default_rng(int(grid[0].seed) if grid else 0)
    for config in grid:
        path = store.begin_run(out, config, "cpu")
        rows = STEPS * DEPTH
        grads = pd.DataFrame({"step": np.repeat(np.arange(STEPS) * 10, DEPTH),
                              "epoch": 0, "layer": np.tile(np.arange(DEPTH), STEPS),
                              "layer_name": np.tile([f"fc{i}" for i in range(DEPTH)], STEPS),
                              **{c: rng.random(rows) for c in GRAD_COLUMNS}})
        epochs = pd.DataFrame({"epoch": [1, 1], "split": ["train", "test"], "step": [400, 400],
                               "loss": rng.random(2), "accuracy": rng.random(2),
                               "seconds": [1.0, 0.1]})
        store.close_run(path, config.run_id(), {"grads": grads, "epochs": epochs}, {
            "status": "complete", "steps": 400, "seconds": 1.0,
            "final_test_accuracy": float(epochs["accuracy"].iloc[1]), "diverged_step": None,
            "error": None})


def make_folder(out: Path, n: int, workers: int = 2) -> list:
    """Write n valid runs through gradlab's writer (skipped when the folder has them), in
    ``workers`` processes."""
    from concurrent.futures import ProcessPoolExecutor

    grid = configs(n)
    if (out / "runs").is_dir() and len(list((out / "runs").iterdir())) == n:
        return grid
    out = store.ensure_out(out)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_runs, [out] * workers, [grid[i::workers] for i in range(workers)]))
    return grid


def duckdb_every_file(out: Path) -> None:
    import duckdb

    con = duckdb.connect()
    runs = str(out / "runs")
    con.sql(f"select count(*) from read_parquet('{runs}/*/grads.parquet', union_by_name=true)"
            ).fetchall()
    con.sql(f"select count(*) from read_parquet('{runs}/*/epochs.parquet')").fetchall()
    con.sql(f"select count(*) from read_json_auto('{runs}/*/status.json')").fetchall()


def pyarrow_grads(out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted((out / "runs").glob("*/grads.parquet"))]
    pa.concat_tables(tables, promote_options="permissive").to_pandas()


def gradlab_ls(out: Path) -> None:
    from gradlab.listing import format_runs, list_runs

    table, _ = list_runs(out)
    format_runs(table)


def resumed_sweep(out: Path) -> None:
    """What a resumed `gradlab sweep` with nothing to train does before its figures (as
    cli.sweep): plan (every run verified once), then the summary table and the verdict of the
    same verified runs."""
    from gradlab.summary import results_verdict, summary_table, sweep_results
    from gradlab.sweep import plan_folder

    grid = configs(int(out.name.removeprefix("runs")))
    todo, _, folder = plan_folder(grid, out)
    assert not todo
    results = sweep_results(out, [c.run_id() for c in grid], folder)
    summary_table(results)
    results_verdict(results)


def load_grads(out: Path) -> None:
    from gradlab import store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store.load(out).grads  # noqa: B018  (read when first used)


def report(out: Path) -> None:
    from gradlab.report import write_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report(out)


TASKS = {"duckdb": duckdb_every_file, "pyarrow": pyarrow_grads, "ls": gradlab_ls,
         "load": load_grads, "sweep": resumed_sweep, "report": report}


def child(task: str, out: str) -> None:
    """Run one task in this (fresh) process; print its seconds (imports not counted)."""
    import pyarrow.parquet  # noqa: F401

    import gradlab.reader  # noqa: F401  (imports of gradlab itself not counted either)

    if task == "duckdb":
        import duckdb  # noqa: F401
    if task == "report":
        import gradlab.report  # noqa: F401
    t0 = time.perf_counter()
    TASKS[task](Path(out))
    print(f"{time.perf_counter() - t0:.6f}")


def measure(task: str, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one task in a fresh process (os.wait4's ru_maxrss)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", task, str(out)],
                            stdout=subprocess.PIPE, text=True)
    text = proc.stdout.read()
    _, code, usage = os.wait4(proc.pid, 0)
    proc.returncode = code
    if code:
        raise SystemExit(f"{task} on {out} failed (wait status {code})")
    return float(text.split()[-1]), usage.ru_maxrss / 1024


def best(task: str, out: Path, repeat: int) -> tuple[float, float]:
    """Min seconds over ``repeat`` fresh processes, and the largest peak memory among them."""
    runs = [measure(task, out) for _ in range(repeat)]
    return min(t for t, _ in runs), max(m for _, m in runs)


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="1000,5000,20000")
    parser.add_argument("--root", default="/tmp/gradlab_scale")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--report-repeat", type=int, default=None,
                        help="repetitions of the report (default: --repeat)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    print(f"# {cpu()}; Python {platform.python_version()}; seconds, min of {args.repeat} "
          f"fresh processes each (imports not counted); peak RSS of the process in MB")
    print("| N runs | gradlab ls | gradlab.load(out).grads | resumed sweep (plan, summary, "
          "verdict) | gradlab report (peak MB) | DuckDB, every file (peak MB) "
          "| pyarrow, grads files | ls / DuckDB | sweep / DuckDB | report / DuckDB "
          "| load.grads / pyarrow |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(v) for v in args.runs.split(",")):
        out = Path(args.root) / f"runs{n}"
        t0 = time.perf_counter()
        make_folder(out, n)
        made = time.perf_counter() - t0
        got = {}
        for task in TASKS:  # interleaved: a load on the machine reaches every column alike
            got[task] = best(task, out, args.report_repeat or args.repeat if task == "report"
                             else args.repeat)
        (duck, duck_mb), (arrow, _), (ls, _), (load, load_mb), (sweep, _), (rep, rep_mb) = (
            got[t] for t in TASKS)
        print(f"| {n:,} | {ls:.2f} | {load:.2f} ({load_mb:.0f} MB) | {sweep:.2f} "
              f"| {rep:.2f} ({rep_mb:.0f} MB) | {duck:.2f} ({duck_mb:.0f} MB) | {arrow:.2f} "
              f"| {ls / duck:.2f}× | {sweep / duck:.2f}× | {rep / duck:.2f}× "
              f"| {load / arrow:.2f}× |  (folder made in {made:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
