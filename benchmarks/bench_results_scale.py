"""Reading results folders of many runs (issue 33): gradlab ls, gradlab.load(out).grads and a
resumed sweep's plan and summary, beside DuckDB reading every file of the same folder and
pyarrow reading the same grads files. Seconds, min of --repeat, in one process.

    python3 benchmarks/bench_results_scale.py --runs 1000,5000,20000 --root /tmp/scale

Folders are made once under --root (synthetic valid runs written through gradlab's own
writer, store.open_run / close_run: depth 3, 40 recorded steps each) and reused.
"""

from __future__ import annotations

import argparse
import platform
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


def make_folder(out: Path, n: int) -> list:
    """Write n valid runs through gradlab's writer (skipped when the folder has them)."""
    grid = configs(n)
    if (out / "runs").is_dir() and len(list((out / "runs").iterdir())) == n:
        return grid
    out = store.ensure_out(out)
    rng = np.random.default_rng(0)
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
    return grid


def best(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def duckdb_every_file(out: Path) -> None:
    import duckdb

    con = duckdb.connect()
    runs = str(out / "runs")
    con.sql(f"select count(*) from read_parquet('{runs}/*/grads.parquet', union_by_name=true)"
            ).fetchall()
    con.sql(f"select count(*) from read_parquet('{runs}/*/epochs.parquet')").fetchall()
    con.sql(f"select count(*) from read_json_auto('{runs}/*/status.json')").fetchall()


def pyarrow_grads(out: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted((out / "runs").glob("*/grads.parquet"))]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def gradlab_ls(out: Path) -> None:
    from gradlab.listing import format_runs, list_runs

    table, _ = list_runs(out)
    format_runs(table)


def resumed_sweep(grid: list, out: Path) -> None:
    """What a resumed sweep with nothing to train does before its figures: plan, summary."""
    from gradlab.summary import summary_table, sweep_results
    from gradlab.sweep import plan

    todo, _ = plan(grid, out)
    assert not todo
    summary_table(sweep_results(out, [c.run_id() for c in grid]))


def load_grads(out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store.load(out).grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="1000,5000,20000")
    parser.add_argument("--root", default="/tmp/gradlab_scale")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}")
    print("| N runs | gradlab ls | gradlab.load(out).grads | resumed sweep (plan + summary) "
          "| DuckDB, every file | pyarrow, grads files | ls / DuckDB | sweep / DuckDB "
          "| load.grads / pyarrow |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(v) for v in args.runs.split(",")):
        out = Path(args.root) / f"runs{n}"
        t0 = time.perf_counter()
        grid = make_folder(out, n)
        made = time.perf_counter() - t0
        duck = best(lambda: duckdb_every_file(out), args.repeat)
        arrow = best(lambda: pyarrow_grads(out), args.repeat)
        ls = best(lambda: gradlab_ls(out), args.repeat)
        load = best(lambda: load_grads(out), args.repeat)
        sweep = best(lambda: resumed_sweep(grid, out), args.repeat)
        print(f"| {n:,} | {ls:.2f} | {load:.2f} | {sweep:.2f} | {duck:.2f} | {arrow:.2f} "
              f"| {ls / duck:.2f}× | {sweep / duck:.2f}× | {load / arrow:.2f}× |"
              f"  (folder made in {made:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
