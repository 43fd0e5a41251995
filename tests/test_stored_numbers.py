"""Issue 33, part C: what a plan, a summary and a verdict need of a run is in its status.json
(``vanishing_ratio``, written at finish), so a resumed sweep reads each run's files once, and
its summary and verdict equal those computed from the records."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from gradlab import reader, store, validate
from gradlab.config import make_config
from gradlab.summary import results_verdict, stored, summary_table, sweep_results
from gradlab.sweep import plan, plan_folder
from gradlab.tables import vanishing_ratios, verdict

STEPS = 6


def write(out, config, status="complete", last_zero=False, ratio=True, grads_rows=True):
    """One run through gradlab's writer; ``ratio=False``: its status.json as written before
    vanishing_ratio was (an old run)."""
    rng = np.random.default_rng(config.seed + 100 * config.depth)
    depth = config.depth
    steps = STEPS if status == "complete" else STEPS // 2
    grads = pd.DataFrame({"step": np.repeat(np.arange(steps) * 10, depth), "epoch": 0,
                          "layer": np.tile(np.arange(depth), steps),
                          "grad_weight_norm": rng.random(steps * depth) + 1e-3})
    if last_zero:  # no step gives a finite ratio: NaN, written as null
        grads.loc[grads["layer"] == depth - 1, "grad_weight_norm"] = 0.0
    if not grads_rows:
        grads = grads.iloc[:0]
    epochs = pd.DataFrame({"epoch": [1, 1], "split": ["train", "test"], "step": [60, 60],
                           "loss": rng.random(2), "accuracy": rng.random(2),
                           "seconds": [1.0, 0.1]})
    if status != "complete":
        epochs = epochs.iloc[:0]
    path = store.begin_run(out, config, "cpu")
    got = store.close_run(path, config.run_id(), {"grads": grads, "epochs": epochs}, {
        "status": status, "steps": steps * 10, "seconds": 1.0,
        "final_test_accuracy": float(epochs["accuracy"].iloc[1]) if len(epochs) else None,
        "diverged_step": steps * 10 if status == "diverged" else None,
        "error": "boom" if status == "failed" else None})
    if not ratio:  # as an older gradlab wrote it
        status_file = path / "status.json"
        data = json.loads(status_file.read_text())
        data.pop("vanishing_ratio", None)
        status_file.write_text(json.dumps(data))
    return got


def grid():
    return [make_config(depth=d, width=4, activation=a, seed=s, epochs=1)
            for d in (2, 4) for a in ("sigmoid", "relu") for s in (0, 1, 2)]


@pytest.fixture
def folder(tmp_path):
    out = store.ensure_out(tmp_path / "res")
    configs = grid()
    for i, config in enumerate(configs):
        write(out, config, status={3: "diverged", 7: "failed"}.get(i, "complete"),
              last_zero=i == 5)
    return out, configs


def loaded(out, run_ids=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return store.load(out, run_ids=run_ids)


def from_records(results):
    """The same results with no verdicts kept: summary and verdict from the records."""
    results.verified = None
    return results


def test_written_ratio_is_vanishing_ratios_of_the_records(folder):
    out, configs = folder
    results = loaded(out)
    ratios = vanishing_ratios(results.grads).set_index("run_id")["vanishing_ratio"]
    for config in configs:
        status = json.loads((store.run_dir(out, config.run_id()) / "status.json").read_text())
        want = ratios[config.run_id()]
        assert (status["vanishing_ratio"] is None) == bool(np.isnan(want))
        if status["vanishing_ratio"] is not None:
            assert status["vanishing_ratio"] == want  # exactly: the same pairs and median


def test_run_ratio_equals_vanishing_ratios_on_any_records():
    rng = np.random.default_rng(0)
    meta = {"config": {"depth": 3}}
    for case in range(60):
        steps = rng.integers(1, 12)
        grads = pd.DataFrame({"step": np.repeat(np.arange(steps), 3),
                              "layer": np.tile(np.arange(3), steps),
                              "grad_weight_norm": rng.choice([0.0, np.inf, np.nan, 1e-30, 2.0,
                                                              *rng.random(5)], 3 * steps)})
        if case % 5 == 0:  # a step recorded twice, a layer missing at some step
            grads = pd.concat([grads, grads.iloc[:2]], ignore_index=True)
        if case % 7 == 0:
            grads = grads.iloc[1:]
        got = store.run_ratio(grads, "r", meta)[0]
        want = vanishing_ratios(grads.assign(run_id="r", depth=3))["vanishing_ratio"].iloc[0]
        assert (got is None and not np.isfinite(want)) or got == want, case


def test_summary_and_verdict_from_status_equal_those_from_records(folder):
    out, _ = folder
    results = loaded(out)
    assert stored(results) is not None
    slow = from_records(loaded(out))
    pd.testing.assert_frame_equal(summary_table(results), summary_table(slow), check_exact=True)
    lines = results_verdict(results)
    assert lines and lines == verdict(slow.grads, slow.epochs, slow.runs)


def test_stored_numbers_read_no_record_file(folder, monkeypatch):
    out, _ = folder
    results = loaded(out)
    monkeypatch.setattr(store.RecordSource, "__call__",
                        lambda self, stem: pytest.fail(f"{stem} records read"))
    summary_table(results)
    results_verdict(results)


def test_old_runs_without_ratio_are_read_from_records(tmp_path):
    out = store.ensure_out(tmp_path / "old")
    configs = grid()[:4]
    for i, config in enumerate(configs):
        write(out, config, ratio=i != 2)
    results = loaded(out)
    assert stored(results) is None
    slow = from_records(loaded(out))
    pd.testing.assert_frame_equal(summary_table(results), summary_table(slow), check_exact=True)
    assert results_verdict(results) == verdict(slow.grads, slow.epochs, slow.runs)


def test_resumed_sweep_reads_each_file_at_most_once(folder, monkeypatch):
    out, configs = folder
    reads = Counter()
    read_bytes = validate.read_bytes

    def counted(path, *args, **kwargs):
        reads[str(path)] += 1
        return read_bytes(path, *args, **kwargs)

    monkeypatch.setattr(validate, "read_bytes", counted)
    monkeypatch.setattr(reader, "read_bytes", counted)
    verified = Counter()
    verify_run = reader.verify_run
    monkeypatch.setattr(reader, "verify_run",
                        lambda path: verified.update([path.name]) or verify_run(path))
    todo, finished, plan_verdicts = plan_folder(configs, out)
    assert sorted(c.run_id() for c in todo) == sorted(
        c.run_id() for i, c in enumerate(configs) if i == 7)  # the failed run: again
    results = sweep_results(out, [c.run_id() for c in configs], plan_verdicts)
    summary_table(results)
    results_verdict(results)
    failed = configs[7].run_id()  # trained again by the sweep: verified again, after it
    assert reads and max(n for path, n in reads.items() if failed not in path) == 1
    assert verified[failed] == 2 and max(verified.values()) == 2
    assert sum(verified.values()) == len(configs) + 1


def test_plan_agrees_with_check_run(folder):
    out, configs = folder
    bad = store.run_dir(out, configs[0].run_id()) / "grads.parquet"
    bad.write_bytes(bad.read_bytes()[:-10])  # damaged: trained again
    todo, finished = plan(configs, out)
    assert {c.run_id() for c in todo} == {configs[0].run_id(), configs[7].run_id()}
    assert finished[configs[3].run_id()]["stored"] == "diverged"
    assert plan(configs, out.parent / "none") == (configs, {})


def test_run_id_cached_and_to_dict_unchanged():
    import dataclasses

    config = make_config(depth=4, width=8, seed=3)
    want = {**dataclasses.asdict(config), "widths": list(config.widths)}
    assert config.to_dict() == want
    first = config.run_id()
    assert config.run_id() is first
    assert dataclasses.replace(config, seed=4).run_id() != first
    assert make_config(depth=4, width=8, seed=3).run_id() == first
