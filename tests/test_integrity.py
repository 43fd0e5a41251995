"""Records that never lie (issue 17): a run is finished only when its files say so, every file
read back is validated (a one-line error or a named skip, never a traceback), a damaged run is
named, its files moved aside and trained again, and every JSON file gradlab writes is strict.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradlab import store
from gradlab.listing import list_runs
from gradlab.summary import sweep_summary

from . import helpers
from .helpers import invoke, run_dirs

# three tiny runs: the fault-injection test damages one and reruns the sweep many times
GRID = ["--depths", "2,3", "--activations", "sigmoid", "--preset", "train", "--width", "8",
        "--seeds", "0", "--epochs", "2", "--train-sizes", "128"]
THIRD = ["--depths", "2", "--activations", "relu", "--preset", "train", "--width", "8",
         "--epochs", "2", "--train-sizes", "128"]


sweep = partial(helpers.sweep, grid=GRID)


def in_grid(out: Path) -> list[Path]:
    """The runs of GRID (sigmoid), not THIRD's."""
    return [run for run in run_dirs(out)
            if json.loads((run / "config.json").read_text())["config"]["activation"] ==
            "sigmoid"]


def file_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished(fake_mnist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "res"
    assert sweep(fake_mnist, out).exit_code == 0
    assert sweep(fake_mnist, out, grid=THIRD).exit_code == 0
    assert len(run_dirs(out)) == 3
    return out


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# -- fault injection ---------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = os.urandom(16)
    if path.suffix == ".json":
        data[:1] = b"@"  # random bytes inside a JSON string may still parse
    path.write_bytes(bytes(data))


def wrong_type(path: Path) -> None:
    """Well-formed, but not what the file should hold."""
    if path.name == "status.json":
        path.write_text('"complete"')
    elif path.name == "config.json":
        meta = json.loads(path.read_text())
        path.write_text(json.dumps({**meta, "provenance": [1]}))
    else:  # a Parquet file of another schema: the norm/accuracy column as text
        frame = pd.read_parquet(path)
        column = "grad_weight_norm" if "grad_weight_norm" in frame else "accuracy"
        frame[column] = frame[column].astype(str)
        frame.to_parquet(path)


def missing(path: Path) -> None:
    path.unlink()


DAMAGES = {"truncate": truncate, "garbage": garbage, "wrong type": wrong_type,
           "missing": missing}
FILES = ("config.json", "grads.parquet", "epochs.parquet", "status.json")


@pytest.mark.slow  # 16 sweeps again; test_a_damaged_dists_file_... is the fast tier's case
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("file", FILES)
def test_a_damaged_file_is_named_set_aside_and_its_run_alone_trained_again(
        finished, fake_mnist, tmp_path, file, damage):
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    victim = in_grid(out)[0]
    others = [run for run in run_dirs(out) if run != victim]
    before = {run.name: file_bytes(run) for run in others}
    original = file_bytes(victim)
    DAMAGES[damage](victim / file)
    damaged_bytes = (victim / file).read_bytes() if (victim / file).exists() else None

    r = sweep(fake_mnist, out)
    assert r.exit_code == 0, r.output
    grid_runs = 2
    assert f"{grid_runs - 1} already finished, 1 to train" in r.stderr, r.stderr
    assert "Traceback" not in r.output
    if file == "status.json" and damage == "missing":  # unfinished, not damaged: redone
        assert "was damaged" not in r.stdout
    else:
        (line,) = [line for line in r.stdout.splitlines() if "was damaged" in line]
        assert victim.name in line and file in line and "trained again" in line
        (aside,) = victim.glob("damaged-*")
        kept = aside / file
        assert (kept.read_bytes() if kept.exists() else None) == damaged_bytes
        # every other file of the damaged run is kept too (moved, not deleted)
        assert {p.name for p in aside.iterdir()} == set(original) - (
            {file} if damage == "missing" else set())
    # exactly that run was trained again: the others' bytes are as they were
    assert {run.name: file_bytes(run) for run in others} == before
    assert strict_loads((victim / "status.json").read_text())["status"] == "complete"
    for name in ("grads.parquet", "epochs.parquet"):
        new, old = pd.read_parquet(victim / name), pd.read_parquet(finished / "runs" /
                                                                   victim.name / name)
        pd.testing.assert_frame_equal(new.drop(columns="seconds", errors="ignore"),
                                      old.drop(columns="seconds", errors="ignore"))
    # the summary counts the run again
    table = sweep_summary(out, [victim.name] + [p.name for p in others])
    assert table["seeds"].sum() == 3
    assert sweep(fake_mnist, out).exit_code == 0  # and now it is simply finished


def test_a_damaged_dists_file_is_named_and_its_run_trained_again(finished, fake_mnist,
                                                                 tmp_path):
    """dists.parquet is optional, but validated when it is there."""
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    victim = in_grid(out)[0]
    (victim / "dists.parquet").write_bytes(b"PAR1 garbage PAR1")
    table, problems = list_runs(out)
    assert victim.name not in set(table["run_id"])
    assert any(victim.name in p and "dists.parquet unreadable" in p for p in problems)
    r = sweep(fake_mnist, out)
    assert r.exit_code == 0 and "1 to train" in r.stderr
    assert any(victim.name in line and "dists.parquet" in line for line in
               r.stdout.splitlines() if "was damaged" in line)
    assert not (victim / "dists.parquet").exists()


def test_ls_names_a_damaged_run_and_lists_the_others(finished, tmp_path):
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    victim = run_dirs(out)[1]
    truncate(victim / "grads.parquet")
    r = invoke("ls", out)
    assert r.exit_code == 0
    (warning,) = r.stderr.strip().splitlines()
    assert warning.startswith("Warning: ") and victim.name in warning
    assert "grads.parquet unreadable" in warning
    assert len(r.stdout.strip().splitlines()) == 1 + 2


# -- wrong JSON types: one line or a named skip, never a traceback -----------------------------

BAD_JSON = {
    "status-a-list": ("status.json", lambda meta: [1, 2], "status.json invalid"),
    "status-a-string": ("status.json", lambda meta: "complete", "status.json invalid"),
    "status-unknown": ("status.json", lambda meta: {**meta, "status": "done"},
                       "status.json invalid"),
    "accuracy-text": ("status.json", lambda meta: {**meta, "final_test_accuracy": "high"},
                      "final_test_accuracy"),
    "provenance-list": ("config.json", lambda meta: {**meta, "provenance": [1]},
                        "provenance"),
    "config-list": ("config.json", lambda meta: {**meta, "config": [1]}, "config.json"),
    "config-bad-depth": ("config.json",
                         lambda meta: {**meta, "config": {**meta["config"], "depth": "deep"}},
                         "config.json invalid"),
    "config-a-number": ("config.json", lambda meta: 7, "config.json invalid"),
}


# every case runs ls, plot and report: one in the fast tier, the others in the slow tier
@pytest.mark.parametrize("case", [case if case == "status-unknown" else
                                  pytest.param(case, marks=pytest.mark.slow) for case in BAD_JSON])
def test_wrong_json_types_are_named_by_every_reader(finished, tmp_path, case):
    file, change, needle = BAD_JSON[case]
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    victim = run_dirs(out)[0]
    path = victim / file
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    for command in (["ls"], ["plot", "--only", "accuracy_by_epoch"], ["report"]):
        r = invoke(*command, out)
        assert r.exit_code == 0, (command, r.output)
        assert "Traceback" not in r.output and r.exception is None, command
        named = [line for line in r.stderr.splitlines() if victim.name in line]
        assert len(named) == 1 and needle in named[0] and "no status.json" not in named[0]
    with pytest.warns(UserWarning, match=needle):
        results = store.load(out)
    assert victim.name not in set(results.runs["run_id"])
    assert set(results.grads["run_id"]) == {p.name for p in run_dirs(out)} - {victim.name}
    table = sweep_summary(out, [p.name for p in run_dirs(out)])
    assert table["seeds"].sum() == 2


def test_a_copied_run_folder_is_a_named_skip_never_counted_twice(finished, tmp_path):
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    source = run_dirs(out)[0]
    shutil.copytree(source, out / "runs" / "zzcopy")
    with pytest.warns(UserWarning, match="zzcopy"):
        results = store.load(out)
    assert len(results.runs) == 3 and "zzcopy" not in set(results.runs["run_id"])
    alone = pd.read_parquet(source / "grads.parquet")
    assert (results.grads["run_id"] == source.name).sum() == len(alone)
    r = invoke("ls", out)
    assert any("zzcopy" in w and source.name in w for w in r.stderr.splitlines())
    r = invoke("report", out)
    assert r.exit_code == 0
    assert "3 runs: 3 complete" in (out / "report.html").read_text(encoding="utf-8")


def test_a_record_file_with_another_runs_rows_is_named(finished, tmp_path):
    """The run_id inside each Parquet file must be its folder's name."""
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    a, b, _ = run_dirs(out)
    shutil.copy(a / "epochs.parquet", b / "epochs.parquet")
    table, problems = list_runs(out)
    assert b.name not in set(table["run_id"])
    assert any(b.name in p and f"belongs to run \"{a.name}\"" in p for p in problems)


def test_a_parquet_file_of_an_unrelated_schema_is_named_and_plot_draws_the_rest(finished,
                                                                               tmp_path):
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    victim = run_dirs(out)[0]
    pq.write_table(pa.table({"x": [1, 2], "run_id": [victim.name] * 2}),
                   victim / "grads.parquet")
    r = invoke("plot", out, "--only", "vanishing_ratio")
    assert r.exit_code == 0 and "Traceback" not in r.output
    assert any(victim.name in w and "no column" in w for w in r.stderr.splitlines())


# -- strict JSON -------------------------------------------------------------------------------

DIVERGING = ["--depths", "5", "--activations", "elu", "--inits", "normal:1", "--lrs", "10",
             "--preset", "train", "--width", "16", "--epochs", "1", "--train-sizes", "256"]
SPEC = """
description = "tiny"

[[sweep]]
depth = 2
width = 8
epochs = 1
train_size = 128

[figures]
only = ["accuracy_by_epoch"]
"""


def test_every_json_file_gradlab_writes_is_strict_json(fake_mnist, tmp_path):
    """train, sweep (with a diverged run, whose accuracy is NaN), figures (its manifest): each
    JSON file parses with a parser that refuses NaN and Infinity."""
    r = invoke("train", "--depth", "2", "--width", "8", "--epochs", "1", "--train-size", "128",
               "--data-dir", fake_mnist, "--out", tmp_path / "train", "-q")
    assert r.exit_code == 0, r.output
    r = sweep(fake_mnist, tmp_path / "sweep", grid=DIVERGING)
    assert r.exit_code == 1, r.output  # the run diverged
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    r = invoke("figures", spec, "--out", tmp_path / "fig", "--data-dir", fake_mnist)
    assert r.exit_code == 0, r.output
    files = sorted(tmp_path.rglob("*.json"))
    assert {p.name for p in files} >= {"config.json", "status.json", "manifest.json"}
    for path in files:
        strict_loads(path.read_text())
    (status,) = (tmp_path / "sweep").glob("runs/*/status.json")
    status = strict_loads(status.read_text())
    assert status["status"] == "diverged" and status["final_test_accuracy"] is None


def test_a_status_json_with_nan_from_an_older_version_still_reads(finished, tmp_path):
    out = tmp_path / "res"
    shutil.copytree(finished, out)
    victim = run_dirs(out)[0]
    path = victim / "status.json"
    path.write_text(path.read_text().replace('"final_test_accuracy": ',
                                             '"final_test_accuracy": NaN, "x": '))
    table, problems = list_runs(out)
    assert problems == [] and len(table) == 3
