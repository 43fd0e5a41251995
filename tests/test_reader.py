"""The one reader (issue 33): ls, load, plot, report and the sweep's plan give every run the
same verdict; a run changed after it finished is named once and left out of every table and
figure; watched runs carry digests like trained ones; load reads what is asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import gradlab
from gradlab.config import make_config
from gradlab.listing import list_runs
from gradlab.sweep import plan

from .helpers import invoke, run_dirs
from .test_hostile import READERS, make_two_runs, save_watched


@pytest.fixture
def two_runs(one_run, fake_mnist, tmp_path) -> Path:
    return make_two_runs(one_run, fake_mnist, tmp_path)


def scale_column(path: Path, column: str, factor: float) -> None:
    table = pq.read_table(path)
    i = table.schema.get_field_index(column)
    pq.write_table(table.set_column(i, column, pc.multiply(table[column], factor)), path)


@pytest.mark.parametrize("change", ["scaled", "emptied"])
def test_records_changed_after_the_run_finished_are_left_out_by_every_reader(two_runs, change):
    victim, other = run_dirs(two_runs)
    path = victim / "grads.parquet"
    if change == "scaled":
        scale_column(path, "grad_weight_norm", 1e6)
    else:
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    for command in READERS:
        r = invoke(*command, two_runs)
        assert r.exit_code == 0, r.output
        named = [line for line in r.stderr.splitlines() if victim.name in line]
        assert len(named) == 1 and "changed since the run finished" in named[0], r.stderr
    with pytest.warns(UserWarning, match="changed since"):
        results = gradlab.load(two_runs)
    assert set(results.runs["run_id"]) == {other.name}
    assert set(results.grads["run_id"]) == set(results.epochs["run_id"]) == {other.name}
    page = (two_runs / "report.html").read_text()
    assert "e+06" not in page
    config = make_config(**__import__("json").loads((victim / "config.json").read_text())
                         ["config"])
    todo, finished = plan([config], two_runs)  # the sweep trains it again
    assert todo == [config] and not finished


def test_a_watched_run_cut_in_half_is_damaged(tmp_path):
    out = tmp_path / "res"
    save_watched(out, "mine", {"lr": 0.1})
    path = out / "runs" / "mine" / "grads.parquet"
    assert "grads.parquet" in __import__("json").loads(
        (path.parent / "status.json").read_text())["sha256"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    table, problems = list_runs(out)
    assert table.empty and len(problems) == 1 and "mine" in problems[0]
    with pytest.warns(UserWarning, match="mine"):
        assert gradlab.load(out).runs.empty


def test_every_reader_gives_each_run_one_verdict(two_runs):
    """One damaged, one unfinished, and the verdicts of ls, load and the plan agree."""
    damaged, unfinished = run_dirs(two_runs)
    (damaged / "epochs.parquet").write_bytes(b"not parquet")
    (unfinished / "status.json").unlink()
    from gradlab.reader import read_folder

    states = {r.run_id: r.state for r in read_folder(two_runs).runs}
    assert states == {damaged.name: "damaged", unfinished.name: "unfinished"}
    table, problems = list_runs(two_runs)
    assert list(table["run_id"]) == [unfinished.name]
    assert [p.split(":")[0] for p in problems] == [damaged.name, unfinished.name]
    with pytest.warns(UserWarning):
        results = gradlab.load(two_runs)
    assert list(results.runs["run_id"]) == [unfinished.name]
    assert results.grads.empty


def test_load_reads_only_what_is_asked(two_runs):
    everything = gradlab.load(two_runs)
    some = gradlab.load(two_runs, columns=["step", "layer", "grad_weight_norm"],
                        filters=[("step", "==", 0)])
    assert set(some.grads.columns) == {"run_id", "step", "layer", "grad_weight_norm"} | (
        set(everything.runs.columns) - {"error", "git_sha", "torch", "gradlab"})
    assert (some.grads["step"] == 0).all() and len(some.grads) > 0
    full = everything.grads[everything.grads["step"] == 0]
    assert sorted(some.grads["grad_weight_norm"]) == sorted(full["grad_weight_norm"])


def test_load_runs_parses_no_record_file(two_runs, monkeypatch):
    from gradlab import reader

    def fail(*args, **kwargs):
        raise AssertionError("a record file was parsed")

    monkeypatch.setattr(reader, "parse_records", fail)
    results = gradlab.load(two_runs)
    assert len(results.runs) == 2
    table, _ = list_runs(two_runs)
    assert len(table) == 2


def test_load_of_a_copied_results_folder_reads_the_same(two_runs, tmp_path):
    a = gradlab.load(two_runs)
    shutil.copytree(two_runs, tmp_path / "copy")
    b = gradlab.load(tmp_path / "copy")
    assert a.grads.equals(b.grads) and a.epochs.equals(b.epochs)
