"""``gradlab ls``: one line per run, damaged runs named on stderr, non-results folders refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .helpers import invoke, sweep


def ls(path):
    return invoke("ls", path, catch_exceptions=False)


@pytest.fixture(scope="module")
def results(fake_mnist, tmp_path_factory) -> Path:
    """Three runs: two complete and one diverged."""
    out = tmp_path_factory.mktemp("ls") / "res"
    r = sweep(fake_mnist, out, "--depths", "3,5", "--activations", "elu", "--inits", "normal:1",
              "--lrs", "10", "--preset", "train", "--width", "16", "--epochs", "1",
              "--train-sizes", "256", catch_exceptions=False)
    assert r.exit_code == 1, r.output  # depth 5 diverges
    r = sweep(fake_mnist, out, "--depths", "2", "--preset", "train", "--width", "8",
              "--epochs", "1", "--train-sizes", "64", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def run_ids(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())


def test_ls_lists_one_line_per_run(results):
    r = ls(results)
    assert r.exit_code == 0 and r.stderr == ""
    header, *lines = r.stdout.strip().splitlines()
    for column in ("run_id", "status", "depth", "widths", "activation", "init", "lr", "seed",
                   "epochs", "test_acc"):
        assert column in header
    assert len(lines) == 3 and sorted(line.split()[0] for line in lines) == run_ids(results)
    diverged = [line for line in lines if " diverged " in line]
    assert len(diverged) == 1 and "diverged at step" in diverged[0]
    assert "16,16,16,16" in diverged[0] and "normal:1.0" in diverged[0]
    assert sum("%" in line for line in lines) == 2  # accuracy of the complete runs


def test_ls_of_one_run_folder(results):
    run = results / "runs" / run_ids(results)[0]
    r = ls(run)
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 2


def test_damaged_runs_are_named_on_stderr_and_the_rest_listed(results, tmp_path):
    out = tmp_path / "res"
    shutil.copytree(results, out)
    bad_parquet, bad_config, unfinished = run_ids(out)
    (out / "runs" / bad_parquet / "grads.parquet").write_bytes(b"PAR1 not really")
    (out / "runs" / bad_config / "config.json").write_text("{ not json")
    (out / "runs" / unfinished / "status.json").unlink()
    (out / "runs" / "0123456789ab").mkdir()  # a run killed before it wrote anything
    r = ls(out)
    assert r.exit_code == 0
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith("Warning: ") for w in warnings)
    assert any(bad_parquet in w and "grads.parquet unreadable" in w for w in warnings)
    assert any(bad_config in w and "config.json unreadable" in w for w in warnings)
    assert any(unfinished in w and "unfinished" in w for w in warnings)
    assert any("0123456789ab" in w for w in warnings)
    _, *lines = r.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [[unfinished, "unfinished"]]


def test_empty_results_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    r = ls(tmp_path)
    assert r.exit_code == 0 and r.stdout.strip() == f"no runs in {tmp_path}"


@pytest.mark.parametrize("make", ["plain folder", "missing", "file"])
def test_not_a_results_folder_is_one_line_error(tmp_path, make):
    path = tmp_path / "x"
    if make == "plain folder":
        path.mkdir()
        (path / "notes.txt").write_text("hi")
    elif make == "file":
        path.write_text("hi")
    r = ls(path)
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in r.output


def test_config_json_of_ls_rows_matches_files(results):
    r = ls(results)
    _, *lines = r.stdout.strip().splitlines()
    for line in lines:
        run_id = line.split()[0]
        config = json.loads((results / "runs" / run_id / "config.json").read_text())["config"]
        assert f" {config['activation']} " in line
