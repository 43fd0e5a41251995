"""``gradlab sweep --ensemble``: the seeds of each configuration trained together, each run
stored as if trained alone (records equal to float rounding), with the sweep's locks, skipping
and failure handling."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest

from gradlab import store
from gradlab.config import make_config
from gradlab.engines.ensemble import run_ensemble, seed_groups
from gradlab.sweep import LOCKED, run_lock

from . import helpers

GRID = ["--depths", "2,3", "--activations", "sigmoid,relu", "--seeds", "0,1,2", "--preset",
        "train", "--width", "8", "--epochs", "2", "--train-sizes", "256"]
sweep = partial(helpers.sweep, grid=GRID, catch_exceptions=False)  # --jobs 1 unless given


def test_seed_groups_keep_grid_order():
    configs = [make_config(depth=d, widths=(4,) * (d - 1), seed=s)
               for d in (2, 3) for s in (0, 1)] + [make_config(depth=2, widths=(4,), seed=5)]
    groups = seed_groups(configs)
    assert [[c.seed for c in g] for g in groups] == [[0, 1, 5], [0, 1]]
    assert [g[0].depth for g in groups] == [2, 3]


@pytest.mark.slow  # 24 runs; test_ensemble.py holds each member to its solo run, fast
def test_ensemble_sweep_matches_the_runs_trained_alone(fake_mnist, tmp_path):
    r = sweep(fake_mnist, tmp_path / "ens", "--ensemble")
    assert r.exit_code == 0, r.output
    # the same runs (same ids: the config's engine is fused) trained one at a time
    assert sweep(fake_mnist, tmp_path / "solo", "--engine", "fused").exit_code == 0
    ens, solo = store.load(tmp_path / "ens"), store.load(tmp_path / "solo")
    assert len(ens.runs) == 12 and (ens.runs["status"] == "complete").all()
    keys = {"grads": ["run_id", "step", "layer"], "epochs": ["run_id", "epoch", "split"]}
    columns = {"grads": ("grad_weight_norm", "grad_output_norm", "weight_norm", "loss",
                         "act_grad_mean"), "epochs": ("loss",)}
    for frame, by in keys.items():
        a = getattr(ens, frame).sort_values(by).reset_index(drop=True)
        b = getattr(solo, frame).sort_values(by).reset_index(drop=True)
        assert a[by].equals(b[by])
        for column in columns[frame]:
            np.testing.assert_allclose(a[column], b[column], rtol=1e-4, atol=1e-7,
                                       err_msg=f"{frame}.{column}")
    meta = json.loads(next((tmp_path / "ens" / "runs").glob("*/config.json")).read_text())
    assert meta["config"]["engine"] == "fused" and meta["provenance"]["ensemble"] == 3
    again = sweep(fake_mnist, tmp_path / "ens", "--ensemble")
    assert again.exit_code == 0 and "12 already finished" in again.output


def test_a_locked_run_is_left_out_of_its_ensemble(fake_mnist, tmp_path):
    configs = [make_config(depth=2, widths=(8,), epochs=1, train_size=256, seed=s)
               for s in (0, 1, 2)]
    store.ensure_out(tmp_path)
    with run_lock(tmp_path, configs[1].run_id()):
        outcomes = run_ensemble([c.to_dict() for c in configs], str(tmp_path), str(fake_mnist),
                                "cpu", 1)
    assert [o["status"] for o in outcomes] == ["complete", LOCKED, "complete"]
    assert outcomes[0]["ensemble_size"] == 2
    assert not (tmp_path / "runs" / configs[1].run_id()).exists()


def test_a_failed_ensemble_stores_each_run_as_failed(fake_mnist, tmp_path, monkeypatch):
    import gradlab.engines.ensemble

    def broken(configs, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(gradlab.engines.ensemble, "train_ensemble", broken)
    r = sweep(fake_mnist, tmp_path, "--ensemble")
    assert r.exit_code == 1 and "Traceback" not in r.output
    runs = store.load(tmp_path).runs
    assert len(runs) == 12 and (runs["status"] == "failed").all()
    for run in (tmp_path / "runs").iterdir():
        if run.is_dir():
            assert "out of memory, say" in (run / "error.txt").read_text()
    monkeypatch.undo()
    assert sweep(fake_mnist, tmp_path, "--ensemble").exit_code == 0  # retrained


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ensemble_sweep_in_worker_processes(fake_mnist, tmp_path, executor):
    if executor == "ray":
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = sweep(fake_mnist, tmp_path, "--ensemble", "--jobs", 2, "--executor", executor)
    finally:
        if executor == "ray":
            ray.shutdown()
    assert r.exit_code == 0, r.output
    runs = store.load(tmp_path).runs
    assert len(runs) == 12 and (runs["status"] == "complete").all()


def test_ensemble_tasks_cut_seed_groups_to_the_cpu_group_size():
    from gradlab.engines.ensemble import ensemble_tasks, group_size

    size = group_size(make_config(depth=3, widths=(128, 256)), __import__("torch").device("cpu"))
    assert size > 1
    configs = [make_config(depth=3, widths=(128, 256), seed=s) for s in range(2 * size + 1)]
    tasks = ensemble_tasks(configs, "cpu")
    assert [len(t) for t in tasks] == [size, size, 1]
    assert [c.seed for t in tasks for c in t] == list(range(2 * size + 1))
    assert group_size(make_config(depth=6, widths=(1000,) * 5), __import__("torch").device(
        "cpu")) == 1  # 38 MB a member
