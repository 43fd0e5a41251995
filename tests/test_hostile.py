"""Results folders damaged by hand or by a hostile user (issue 33): a digest key that is a path,
a FIFO, a device or a link; a JSON file nested too deep or too large; a claims.csv that is not
one; a user's config key named as one of gradlab's; a spec claim with a wrongly typed field.
Each damages its run alone (named in one line), or is a one-line error, never a hang or a
traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import gradlab
from gradlab import store
from gradlab.experiment import SpecError, load_spec
from gradlab.listing import list_runs

from .helpers import invoke, run_dirs

READERS = (["ls"], ["plot", "--only", "accuracy_by_epoch"], ["report"])


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail (rather than hang the suite) if the block takes longer than ``seconds``."""
    def stop(signum, frame):
        raise TimeoutError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def two_runs(one_run, fake_mnist, tmp_path) -> Path:
    return make_two_runs(one_run, fake_mnist, tmp_path)


def make_two_runs(one_run: Path, fake_mnist: Path, tmp_path: Path) -> Path:
    """A copy of ``one_run`` with a second complete run (a copy of the first under its own
    id would be damaged: a run's files name it)."""
    out = tmp_path / "res"
    shutil.copytree(one_run, out)
    r = invoke("sweep", "--preset", "train", "--depths", "3", "--width", "8", "--epochs", "1",
               "--train-sizes", "64", "--jobs", "1", "--data-dir", fake_mnist, "--out", out)
    assert r.exit_code == 0, r.output
    assert len(run_dirs(out)) == 2
    return out


def edit_status(run: Path, change) -> None:
    path = run / "status.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def assert_named_alone(out: Path, victim: Path, needle: str) -> None:
    """Every reader names ``victim`` in one line holding ``needle`` and goes on with the
    others; none hangs or shows a traceback."""
    others = {p.name for p in run_dirs(out)} - {victim.name}
    with no_hang():
        table, problems = list_runs(out)
        assert set(table["run_id"]) == others
        named = [p for p in problems if victim.name in p]
        assert len(named) == 1 and needle in named[0], problems
        for command in READERS:
            r = invoke(*command, out)
            assert r.exit_code == 0 and r.exception is None, (command, r.output)
            assert "Traceback" not in r.output
            named = [line for line in r.stderr.splitlines() if victim.name in line]
            assert len(named) == 1 and needle in named[0], (command, r.stderr)
        with pytest.warns(UserWarning, match=needle):
            results = gradlab.load(out)
    assert set(results.runs["run_id"]) == others
    assert set(results.grads["run_id"]) == others


# -- digests: keys are plain names of files of the run --------------------------------------


@pytest.mark.parametrize("key", ["../../../../../../dev/zero", "/etc/hostname", "../other",
                                 ".hidden", "sub/grads.parquet"])
def test_a_digest_key_that_is_a_path_damages_its_run(two_runs, key):
    victim = run_dirs(two_runs)[0]
    edit_status(victim, lambda s: {**s, "sha256": {**s["sha256"], key: "0" * 64}})
    assert_named_alone(two_runs, victim, "plain file names")


def test_a_digest_key_naming_a_fifo_damages_its_run_without_a_hang(two_runs):
    victim = run_dirs(two_runs)[0]
    os.mkfifo(victim / "pipe")
    edit_status(victim, lambda s: {**s, "sha256": {**s["sha256"], "pipe": "0" * 64}})
    assert_named_alone(two_runs, victim, "pipe is not a regular file")


def test_a_record_file_that_is_a_link_out_of_the_run_damages_it(two_runs, tmp_path):
    """Even a link to a byte-for-byte copy (its digest holds) is not read: a run's files are
    its own."""
    victim = run_dirs(two_runs)[0]
    elsewhere = tmp_path / "elsewhere.parquet"
    shutil.copy(victim / "grads.parquet", elsewhere)
    (victim / "grads.parquet").unlink()
    (victim / "grads.parquet").symlink_to(elsewhere)
    assert_named_alone(two_runs, victim, "grads.parquet is a link")


def test_a_status_json_that_is_a_fifo_damages_its_run_without_a_hang(two_runs):
    victim = run_dirs(two_runs)[0]
    (victim / "status.json").unlink()
    os.mkfifo(victim / "status.json")
    assert_named_alone(two_runs, victim, "status.json is not a regular file")


def test_a_record_file_that_is_a_device_damages_its_run(two_runs):
    victim = run_dirs(two_runs)[0]
    (victim / "grads.parquet").unlink()
    (victim / "grads.parquet").symlink_to("/dev/zero")
    assert_named_alone(two_runs, victim, "grads.parquet is a link")


# -- JSON: any error, depth and size included, damages one run ------------------------------


def test_a_config_json_nested_too_deep_damages_its_run_not_the_folder(two_runs):
    victim = run_dirs(two_runs)[0]
    (victim / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_named_alone(two_runs, victim, "nested too deep")


def test_a_json_file_over_the_size_limit_damages_its_run(two_runs):
    victim = run_dirs(two_runs)[0]
    edit_status(victim, lambda s: {**s, "note": "x" * (5 * 2**20)})
    assert_named_alone(two_runs, victim, "status.json too large")


@pytest.mark.parametrize("value", [1e300, -0.5, 1.5])
def test_an_accuracy_out_of_range_damages_its_run(two_runs, value):
    victim = run_dirs(two_runs)[0]
    edit_status(victim, lambda s: {**s, "final_test_accuracy": value})
    assert_named_alone(two_runs, victim, "final_test_accuracy")


def test_a_long_error_note_is_cut_when_written(tmp_path):
    out = store.ensure_out(tmp_path / "res")
    path = store.open_run(out, "r1", {"config": {}, "provenance": {}})
    status = store.close_run(path, "r1", {}, {"status": "failed", "error": "E" * 10**6})
    assert len(status["error"]) <= store.ERROR_CHARS
    assert (path / "status.json").stat().st_size < 10_000


# -- claims.csv ------------------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    ("", "not a CSV table"),
    ("a,b\n1,2\n", "no column claim"),
    (None, "not a regular file"),
])
def test_a_claims_csv_that_is_not_one_is_a_one_line_warning(one_run, tmp_path, content,
                                                            needle):
    out = tmp_path / "res"
    shutil.copytree(one_run, out)
    if content is None:
        os.mkfifo(out / "claims.csv")
    else:
        (out / "claims.csv").write_text(content)
    with no_hang():
        r = invoke("report", out)
    assert r.exit_code == 0 and r.exception is None, r.output
    warned = [line for line in r.stderr.splitlines() if "claims.csv" in line]
    assert len(warned) == 1 and needle in warned[0], r.stderr
    assert (out / "report.html").exists()


# -- spec claims, checked before anything trains --------------------------------------------


CLAIM = ('[[claim]]\nclaim = "the first layer learns slowest"\nsource = "a book"\n'
         'published = 0.5\nmeasure = "grad_at_layer"\n')


@pytest.mark.parametrize("extra, field", [
    ('expect = { between = 5 }', "expect.between=5"),
    ('expect = { between = [2, 1] }', "expect.between=[2, 1]"),
    ('expect = { below = "low" }', "expect.below='low'"),
    ('expect = { below = 1 }\nscale = "x"', "scale='x'"),
    ('expect = { below = 1 }\nlayer = "zero"', "layer='zero'"),
    ('expect = { below = 1 }\ncolumn = "nope"', "column='nope'"),
    ('expect = { below = 1 }\nstep = -1', "step=-1"),
    ('expect = { below = 1 }\nstep = "first"', "step='first'"),
    ('expect = { below = 1 }\nq = 2', "q=2"),
    ('expect = { below = 1 }\nruns = { depth = {} }', "runs.depth"),
    ('expect = { below = 1 }\ndiffers = 3', "differs=3"),
])
def test_a_wrongly_typed_claim_field_is_a_spec_error_naming_claim_and_field(tmp_path, extra,
                                                                             field):
    spec = tmp_path / "bad.toml"
    spec.write_text('[[sweep]]\ndepth = 2\nepochs = 1\n' + CLAIM + extra + "\n")
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    message = str(e.value)
    assert "\n" not in message and "[[claim]] 1" in message
    assert "the first layer learns slowest" in message and field in message


def test_within_a_published_zero_is_a_spec_error(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('[[sweep]]\ndepth = 2\nepochs = 1\n'
                    + CLAIM.replace("0.5", "0") + "expect = { within = 0.1 }\n")
    with pytest.raises(SpecError, match="published value other than 0"):
        load_spec(spec)


def test_a_bad_claim_stops_figures_before_any_run_trains(tmp_path, fake_mnist):
    spec = tmp_path / "bad.toml"
    spec.write_text('[[sweep]]\ndepth = 2\nepochs = 1\ntrain_size = 64\n' + CLAIM
                    + 'expect = { between = 5 }\n')
    r = invoke("figures", spec, "--out", tmp_path / "out", "--data-dir", fake_mnist)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "expect.between=5" in r.stderr
    assert not (tmp_path / "out" / "runs").exists()


# -- a user's config keys never stand in gradlab's ------------------------------------------


def save_watched(out: Path, name: str, config: dict) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(),
                                torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, optimizer, log_every=1) as rec:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(5, 4)).pow(2).mean().backward()
            optimizer.step()
    rec.save(out, name=name, config=config)


@pytest.mark.parametrize("config, columns", [
    ({"depth": 3}, {"config_depth": 3}),
    ({"depth": "deep"}, {"config_depth": "deep"}),
    ({"run_id": "other"}, {"config_run_id": "other"}),
    ({"step": 7, "layer": "x"}, {"config_step": 7, "config_layer": "x"}),
    ({"activation": 5, "status": "x", "config_status": "y"},
     {"config_activation": 5, "config_config_status": "x", "config_status": "y"}),
    ({"lr": 0.5, "activation": "relu", "seed": 1}, {"lr": 0.5, "activation": "relu", "seed": 1}),
])
def test_a_users_config_key_named_as_gradlabs_crashes_nothing(one_run, tmp_path, config,
                                                              columns):
    """A user's key is kept by its own name where it means what gradlab's does (lr = 0.5), else
    as config_<key> (depth, a run column, a record column, a value of another kind)."""
    out = tmp_path / "res"
    shutil.copytree(one_run, out)
    save_watched(out, "mine", config)
    for command in READERS:
        r = invoke(*command, out)
        assert r.exit_code == 0 and r.exception is None, (command, r.output)
        assert "Traceback" not in r.output
    results = gradlab.load(out)
    assert set(results.runs["run_id"]) == {p.name for p in run_dirs(out)}
    assert set(results.grads["run_id"]) == set(results.runs["run_id"])
    assert not results.grads.columns.duplicated().any()
    mine = results.runs[results.runs["run_id"] == "mine"].iloc[0]
    assert mine["status"] == "complete"
    assert {c: mine[c] for c in columns} == columns
    for key in set(config) - set(columns):  # gradlab's own column is not the user's
        assert key not in results.runs or key in ("run_id", "status") or mine[key] != mine[key]
    grads = results.grads[results.grads["run_id"] == "mine"]
    assert grads["step"].tolist() == sorted(grads["step"])  # the records' own step
    gradlab_run = results.runs[results.runs["source"] == "gradlab"].iloc[0]
    assert gradlab_run["depth"] == 2


def test_a_record_file_whose_pandas_metadata_is_not_utf8_damages_its_run(two_runs):
    """Bytes changed inside a Parquet footer's pandas metadata fail only when the table is
    converted to pandas (UnicodeDecodeError): the run is damaged, named once, no traceback."""
    victim = run_dirs(two_runs)[0]
    path = victim / "grads.parquet"
    data = bytearray(path.read_bytes())
    at = data.index(b'"index_columns"') + 30
    data[at:at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    assert_named_alone(two_runs, victim, "grads.parquet unreadable")
