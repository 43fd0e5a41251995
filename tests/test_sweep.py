"""``gradlab sweep``: the cross product into the results layout, skipping, resuming after Ctrl-C
and SIGKILL, failures that do not stop it, the per-run lock, --jobs, Ray, and readers."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from gradlab import store
from gradlab.sweep import LOCKED, run_lock, run_one, summary_table

from . import helpers
from .helpers import assert_same_records, gradlab_process, invoke, statuses, wait_for_file

# 2 depths x 2 activations, tiny and fast
GRID = ["--preset", "train", "--depths", "2,3", "--activations", "sigmoid,relu", "--width", "8",
        "--epochs", "1", "--train-sizes", "128"]

# in this process (``--jobs 1``) unless the test says otherwise: monkeypatches reach it
sweep = partial(helpers.sweep, grid=GRID, catch_exceptions=False)


def no_temp_files(out: Path) -> bool:
    return not list((out / "runs").glob("*/.*.tmp"))


@pytest.fixture(scope="module")
def done(fake_mnist, tmp_path_factory) -> Path:
    """The GRID swept once, uninterrupted; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("done") / "sweep"
    r = sweep(fake_mnist, out)
    assert r.exit_code == 0, r.output
    return out


def copy(done: Path, tmp_path: Path) -> Path:
    shutil.copytree(done, tmp_path / "copy")
    return tmp_path / "copy"


def test_sweep_writes_the_cross_product(done):
    runs = sorted(p for p in (done / "runs").iterdir() if p.is_dir())
    assert len(runs) == 4
    seen = set()
    for run in runs:
        assert sorted(p.name for p in run.iterdir()) == sorted(store.FILES)
        config = json.loads((run / "config.json").read_text())["config"]
        seen.add((config["depth"], config["activation"]))
        assert config["widths"] == [8] * (config["depth"] - 1)
    assert seen == {(d, a) for d in (2, 3) for a in ("sigmoid", "relu")}
    assert set(statuses(done).values()) == {"complete"}


SEEDS_GRID = ["--preset", "train", "--depths", "2", "--activations", "sigmoid,relu", "--width",
              "8", "--epochs", "2", "--train-sizes", "64", "--seeds", "0,1"]


@pytest.fixture(scope="module")
def seeds_sweep(fake_mnist, tmp_path_factory):
    """Two activations x two seeds: the result of the CLI, and its folder."""
    out = tmp_path_factory.mktemp("seeds") / "sweep"
    return sweep(fake_mnist, out, grid=SEEDS_GRID), out


def test_output_has_progress_lines_and_the_summary_table(seeds_sweep):
    r, out = seeds_sweep
    assert r.exit_code == 0, r.output
    assert "4 to train" in r.stderr
    assert len([line for line in r.stderr.splitlines() if "complete " in line]) == 4
    lines = r.stdout.strip().splitlines()
    table = lines[:lines.index("")]  # then the story in plain words, the run count, the figures
    assert "test accuracy" in table[0] and "vanishing ratio" in table[0]
    assert len(table) == 3 and " ± " in table[1] and lines[-5].startswith("4 of 4 runs complete")
    assert lines[len(table) + 1].startswith("In plain words")
    assert lines[-4:-1] == ["figures:", *(f"  {out / 'figures' / name}.png" for name in
                                          ("vanishing_ratio", "accuracy_by_epoch"))]
    assert lines[-1].startswith(f"next: gradlab report {out}")


def test_again_skips_all_without_needing_the_data(done, tmp_path):
    out = copy(done, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*")}
    (tmp_path / "no_data").mkdir()
    r = sweep(tmp_path / "no_data", out)
    assert r.exit_code == 0, r.output
    assert "4 already finished, 0 to train" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*")} == before


@pytest.mark.slow  # every figure drawn again; the report's own tests are fast
def test_report_option_writes_the_report(done, fake_mnist, tmp_path):
    out = copy(done, tmp_path)
    r = sweep(fake_mnist, out, "--report")
    assert r.exit_code == 0, r.output
    assert (out / "report.html").is_file() and r.stdout.strip().endswith("report.html")


def test_unfinished_run_is_redone(done, fake_mnist, tmp_path):
    out = copy(done, tmp_path)
    run = sorted((out / "runs").glob("*/status.json"))[0].parent
    (run / "status.json").unlink()
    (run / "grads.parquet").write_bytes(b"half a file")  # as if killed mid-write
    (run / ".epochs.parquet.123.tmp").write_bytes(b"left by a killed writer")
    r = sweep(fake_mnist, out)
    assert r.exit_code == 0, r.output
    assert "3 already finished, 1 to train" in r.stderr
    assert statuses(out)[run.name] == "complete" and no_temp_files(out)
    assert_same_records(out, done)


def test_a_failing_run_does_not_stop_the_others_and_is_rerun(done, fake_mnist, tmp_path,
                                                            monkeypatch):
    import gradlab.runner

    real_train = gradlab.runner.train

    def train(config, **kw):
        if config.activation == "relu" and config.depth == 3:
            raise RuntimeError("boom")
        return real_train(config, **kw)

    monkeypatch.setattr(gradlab.runner, "train", train)
    out = tmp_path / "o"
    r = sweep(fake_mnist, out)
    assert r.exit_code == 1, r.output
    failed = [k for k, v in statuses(out).items() if v == "failed"]
    assert len(failed) == 1 and len(statuses(out)) == 4
    assert (out / "runs" / failed[0] / "error.txt").is_file()
    assert "3 of 4 runs complete" in r.stdout and "failed: RuntimeError: boom" in r.stdout
    monkeypatch.setattr(gradlab.runner, "train", real_train)
    again = sweep(fake_mnist, out)
    assert again.exit_code == 0, again.output
    assert "3 already finished, 1 to train" in again.stderr
    assert_same_records(out, done)


def test_a_diverging_run_is_recorded_and_not_retried(fake_mnist, tmp_path):
    grid = ["--depths", "3,5", "--activations", "elu", "--inits", "normal:1", "--lrs", "10",
            "--width", "16", "--epochs", "1", "--train-sizes", "256", "--preset", "train"]
    r = sweep(fake_mnist, tmp_path, grid=grid)
    assert r.exit_code == 1, r.output
    assert sorted(statuses(tmp_path).values()) == ["complete", "diverged"]
    assert "1 of 2 runs complete" in r.stdout and "diverged at step" in r.stdout
    # the summary leaves the diverged run's partial records out of its statistics
    table = summary_table(store.load(tmp_path)).set_index("diverged")
    assert table.loc[0, "vanishing_ratio_mean"] > 0 and table.loc[0, "seeds"] == 1
    assert math.isnan(table.loc[1, "vanishing_ratio_mean"]) and table.loc[1, "seeds"] == 0
    printed = [line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["elu"]]
    assert sorted(row[-1] for row in printed)[-1] == "n/a", r.stdout
    assert "every run diverged at depth 5" in r.stdout and "at depth 3, 5" not in r.stdout
    again = sweep(fake_mnist, tmp_path, grid=grid)
    assert again.exit_code == 1 and "2 already finished, 0 to train" in again.stderr


def test_locked_run_is_skipped_as_running_elsewhere(done, fake_mnist, tmp_path):
    out = tmp_path / "o"
    run_id = sorted(p.name for p in (done / "runs").iterdir() if p.is_dir())[0]
    store.ensure_out(out)
    with run_lock(out, run_id) as mine:
        assert mine
        r = sweep(fake_mnist, out)
        assert r.exit_code == 1, r.output
        assert f"{run_id} " in r.stdout and "running elsewhere" in r.stdout
        assert not (out / "runs" / run_id).exists()  # never touched
        assert len(statuses(out)) == 3
    assert sweep(fake_mnist, out).exit_code == 0
    assert_same_records(out, done)


def test_run_one_skips_a_run_finished_by_another_process(done):
    meta = json.loads(next((done / "runs").glob("*/config.json")).read_text())
    outcome = run_one(meta["config"], str(done), None, "cpu", 1)
    assert outcome["status"] == "finished elsewhere"
    with run_lock(done, meta["run_id"]):
        assert run_one(meta["config"], str(done), None, "cpu", 1)["status"] == LOCKED


@pytest.mark.slow  # worker processes
def test_jobs_2_gives_the_same_records_as_jobs_1(done, fake_mnist, tmp_path):
    r = sweep(fake_mnist, tmp_path, "--jobs", 2)
    assert r.exit_code == 0, r.output
    assert_same_records(tmp_path, done)


@pytest.mark.slow  # a local Ray cluster
def test_ray_executor_gives_the_same_records(done, fake_mnist, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = sweep(fake_mnist, tmp_path, "--executor", "ray", "--jobs", 2)
    finally:
        ray.shutdown()
    assert r.exit_code == 0, r.output
    assert_same_records(tmp_path, done)


def test_missing_ray_is_one_line(fake_mnist, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    r = sweep(fake_mnist, tmp_path / "o", "--executor", "ray")
    assert r.exit_code == 2
    assert r.output.strip() == "Error: ray is not installed: pip install 'gradlab[ray]'"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["--depths", "3", "--layer-widths", "8"], "widths"),
    (["--activations", "sigmoid,swish"], "--activations"),
    (["--lrs", "0.1,-1"], "--lrs"),
    (["--jobs", "0"], "--jobs"),
    (["--executor", "dask"], "--executor"),
])
def test_bad_input_is_one_line_and_writes_nothing(fake_mnist, tmp_path, args, needle):
    r = invoke("sweep", *args, "--data-dir", fake_mnist, "--out", tmp_path / "o")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert needle in r.output and not (tmp_path / "o").exists()


def test_missing_data_and_bad_out_write_nothing(fake_mnist, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = sweep(empty, tmp_path / "o")
    assert r.exit_code == 2 and "MNIST" in r.output and not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("")
    r = sweep(fake_mnist, tmp_path / "file")
    assert r.exit_code == 2 and "is a file" in r.output.strip()


# -- interrupted sweeps, in a real process (the slow tier) -------------------------------------

SLOW_GRID = ["--preset", "train", "--depths", "2,3", "--activations", "sigmoid,relu", "--width",
             "16", "--epochs", "2", "--train-sizes", "256"]


def start(data: Path, out: Path, jobs: str = "1") -> subprocess.Popen:
    return gradlab_process("sweep", *SLOW_GRID, "--jobs", jobs, "--data-dir", data, "--out", out)


@pytest.fixture(scope="module")
def slow_done(fake_mnist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slow") / "sweep"
    r = sweep(fake_mnist, out, grid=SLOW_GRID)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_sigkill_then_again_gives_the_records_of_an_uninterrupted_sweep(slow_done, fake_mnist,
                                                                         tmp_path):
    proc = start(fake_mnist, tmp_path)
    wait_for_file(proc, tmp_path, "runs/*/status.json", timeout=60)  # a run finished
    proc.kill()
    proc.communicate()
    assert len(statuses(tmp_path)) < 4  # killed mid-sweep
    r = sweep(fake_mnist, tmp_path, grid=SLOW_GRID)
    assert r.exit_code == 0, r.output
    assert no_temp_files(tmp_path)
    assert_same_records(tmp_path, slow_done)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_exits_130_keeps_finished_runs(fake_mnist, tmp_path, jobs):
    proc = start(fake_mnist, tmp_path, jobs)
    wait_for_file(proc, tmp_path, "runs/*/status.json", timeout=60)  # a run finished
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Interrupted: finished runs are kept"), err
    assert "Traceback" not in err
    finished = statuses(tmp_path)
    assert 1 <= len(finished) < 4 and set(finished.values()) == {"complete"}
    assert no_temp_files(tmp_path)
    for run in finished:  # every finished run is whole
        assert len(store.load(tmp_path / "runs" / run).grads) > 0
    if jobs == "2":  # the workers are gone too
        time.sleep(0.5)
        ps = subprocess.run(["ps", "-o", "ppid=", "-A"], capture_output=True, text=True)
        assert str(proc.pid) not in ps.stdout.split()


# -- the summary table and other readers ------------------------------------------------------


def test_summary_table_against_the_files(seeds_sweep):
    _, out = seeds_sweep
    per_run = {}  # activation -> [(final test accuracy, vanishing ratio)], computed by hand
    for run in (out / "runs").iterdir():
        if not run.is_dir():
            continue
        config = json.loads((run / "config.json").read_text())["config"]
        grads = pq.read_table(run / "grads.parquet").to_pydict()
        first, last = {}, {}
        for step, layer, g in zip(grads["step"], grads["layer"], grads["grad_weight_norm"]):
            if layer == 0:
                first[step] = g
            if layer == config["depth"] - 1:
                last[step] = g
        ratio = float(np.median([first[s] / last[s] for s in first]))
        epochs = pq.read_table(run / "epochs.parquet").to_pydict()
        acc = [a for a, split in zip(epochs["accuracy"], epochs["split"]) if split == "test"][-1]
        per_run.setdefault(config["activation"], []).append((acc, ratio))
    table = summary_table(store.load(out)).set_index("activation")
    assert sorted(table.index) == ["relu", "sigmoid"]
    for activation, values in per_run.items():
        row = table.loc[activation]
        acc, ratio = np.array(values).T
        assert row["seeds"] == 2 and row["depth"] == 2
        assert row["test_accuracy_mean"] == pytest.approx(acc.mean())
        assert row["test_accuracy_sd"] == pytest.approx(acc.std(ddof=1))
        assert row["vanishing_ratio_mean"] == pytest.approx(ratio.mean())
        assert row["vanishing_ratio_sd"] == pytest.approx(ratio.std(ddof=1))


def test_summary_table_of_a_sweep(done):
    table = summary_table(store.load(done))
    assert sorted(table[["depth", "activation"]].itertuples(index=False, name=None)) == [
        (2, "relu"), (2, "sigmoid"), (3, "relu"), (3, "sigmoid")]
    assert (table["seeds"] == 1).all() and table["test_accuracy_sd"].isna().all()
    assert (table["vanishing_ratio_mean"] > 0).all()


def grads_files(out: Path) -> list[str]:
    return sorted(str(p) for p in (out / "runs").glob("*/grads.parquet"))


def test_grads_of_a_sweep_read_with_pyarrow_dataset(done):
    expected = sum(len(pd.read_parquet(f)) for f in grads_files(done))
    table = ds.dataset(grads_files(done), format="parquet").to_table()
    assert table.num_rows == expected and set(table.column("run_id").to_pylist()) == set(
        p.name for p in (done / "runs").iterdir() if p.is_dir())
    # the whole runs/ folder as one dataset, picking the grads files by name
    whole = ds.dataset(done / "runs", format="parquet", exclude_invalid_files=True)
    picked = [f for f in whole.files if os.path.basename(f) == "grads.parquet"]
    assert len(picked) == 4 and ds.dataset(picked, format="parquet").count_rows() == expected


def test_grads_of_a_sweep_read_with_polars_and_duckdb(done):
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    pattern = str(done / "runs" / "*" / "grads.parquet")
    frame = pl.read_parquet(pattern)
    counts = duckdb.sql(f"select run_id, count(*) as n from read_parquet('{pattern}') "
                        f"group by run_id order by run_id").fetchall()
    assert sum(n for _, n in counts) == frame.height == sum(
        len(pd.read_parquet(f)) for f in grads_files(done))
    assert len(counts) == 4
