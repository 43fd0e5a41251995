"""``gradlab figures SPEC --check``: identical records say "identical"; a perturbed committed
summary or claim gives each number's drift in seed sd, the changed verdict and exit 1; bad
input is one line."""

import json
import shutil

import pandas as pd
import pytest

from gradlab.check import Built, compare, summary_drifts

from .helpers import invoke

SPEC = """
description = "tiny, for --check"

[[sweep]]
depth = 3
width = 16
activation = ["sigmoid", "relu"]
epochs = 1
train_size = 256
batch_size = 32
seed = [0, 1]

[figures]
only = ["vanishing_ratio"]

[[claim]]
claim = "ReLU keeps its gradient"
source = "the test"
published = "kept"
measure = "layer_ratio"
runs = { activation = "relu" }
step = "median"
expect = { above = 0.001 }
"""


@pytest.fixture(scope="module")
def committed(tmp_path_factory, fake_mnist):
    """A built experiment, as it would be committed, with its records."""
    root = tmp_path_factory.mktemp("check")
    spec = root / "tiny.toml"
    spec.write_text(SPEC)
    r = invoke("figures", spec, "--native", "--out", root / "built", "--data-dir", fake_mnist,
               "-j", "1")
    assert r.exit_code == 0, r.output
    return spec, root / "built"


def copy_of(committed, tmp_path):
    spec, built = committed
    shutil.copytree(built, tmp_path / "built")
    return spec, tmp_path / "built"


def check(spec, out, data, *args):
    return invoke("figures", spec, "--check", "--native", "--out", out, "--data-dir", data,
                  "-j", "1", *args)


def files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_same_records_are_identical_and_nothing_is_written(committed, tmp_path, fake_mnist):
    spec, out = copy_of(committed, tmp_path)
    before = files(out)
    r = check(spec, out, fake_mnist)
    assert r.exit_code == 0, r.output
    first = r.output.strip().splitlines()[-1]
    assert first.startswith("tiny: identical: records sha256 ")
    assert "1 of 1 figures and 3 of 3 tables byte-identical" in first
    assert files(out) == before


def perturb(out, *, shift_sd: float, verdict: str | None = None) -> float:
    """Make the committed files of ``out`` look as if built elsewhere: another records hash, the
    first row's test accuracy moved by ``shift_sd`` of its sd, and maybe another verdict.
    Returns that row's rebuilt accuracy drift in sd as this check should compute it."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["records_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    summary = pd.read_csv(out / "summary.csv")
    old = summary.loc[0, "test_accuracy_mean"]
    sd = summary.loc[0, "test_accuracy_sd"]
    summary.loc[0, "test_accuracy_mean"] = old + shift_sd * sd
    summary.to_csv(out / "summary.csv", index=False)
    if verdict is not None:
        claims = pd.read_csv(out / "claims.csv")
        claims.loc[0, "verdict"] = verdict
        claims.to_csv(out / "claims.csv", index=False)
    return (old - summary.loc[0, "test_accuracy_mean"]) / sd


def test_a_drift_within_the_tolerance_agrees(committed, tmp_path, fake_mnist):
    spec, out = copy_of(committed, tmp_path)
    drift = perturb(out, shift_sd=0.5)
    r = check(spec, out, fake_mnist)
    assert r.exit_code == 0, r.output
    assert "tiny: records differ" in r.output and "agrees within 2 seed sd" in r.output
    assert f"({drift:+.2f} sd)" in r.output
    assert "claims' verdicts unchanged" in r.output


def test_a_changed_verdict_and_a_large_drift_disagree(committed, tmp_path, fake_mnist):
    spec, out = copy_of(committed, tmp_path)
    drift = perturb(out, shift_sd=5, verdict="does not hold")
    r = check(spec, out, fake_mnist)
    assert r.exit_code == 1, r.output
    assert "a claim's verdict changed" in r.output and "disagrees beyond 2 seed sd" in r.output
    assert "verdict 'does not hold' -> 'holds'" in r.output
    assert f"{drift:+.2f} sd, beyond 2 sd" in r.output
    assert "Traceback" not in r.output
    # a wider tolerance lets the drift pass, not the verdict
    r = check(spec, out, fake_mnist, "--tolerance", "10")
    assert r.exit_code == 1 and "beyond 10 sd" not in r.output and "verdict" in r.output


def test_drift_is_in_units_of_the_committed_seed_sd():
    reference = pd.DataFrame({"activation": ["relu", "sigmoid"], "seeds": [3, 1],
                              "test_accuracy_mean": [0.9, 0.5], "test_accuracy_sd": [0.02, None],
                              "diverged": [0, 0], "failed": [0, 0]})
    rebuilt = reference.assign(test_accuracy_mean=[0.93, 0.6])
    lines, problems = summary_drifts(reference, rebuilt, tolerance=2)
    assert any("relu" in line and f"({(0.93 - 0.9) / 0.02:+.2f} sd)" in line for line in lines)
    assert any("sigmoid" in line and "one seed: no seed sd, not judged" in line
               for line in lines)
    assert problems == []
    lines, problems = summary_drifts(reference, rebuilt, tolerance=1)
    assert len(problems) == 1 and "beyond 1 sd" in problems[0]
    # a row that went, and a count that changed, disagree whatever the tolerance
    _, problems = summary_drifts(reference, rebuilt.assign(diverged=[1, 0]).iloc[:1], 100)
    assert {"diverged 0 -> 1" in p for p in problems} == {True, False}
    assert any("committed only" in p for p in problems)


def test_identical_needs_only_the_records_hash():
    manifest = {"records_sha256": "a" * 64, "figures": {}, "tables": {}}
    same = Built(manifest, pd.DataFrame(), pd.DataFrame())
    assert compare(same, same).identical and compare(same, same).ok


@pytest.mark.parametrize("damage, needle", [
    (lambda out: (out / "manifest.json").unlink(), "has no manifest.json to check against"),
    (lambda out: (out / "manifest.json").write_text("{not json"), "cannot read"),
    (lambda out: (out / "manifest.json").write_text("[]"), "is not a gradlab figures manifest"),
])
def test_nothing_to_check_against_is_one_line(committed, tmp_path, fake_mnist, damage, needle):
    spec, out = copy_of(committed, tmp_path)
    damage(out)
    r = check(spec, out, fake_mnist)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_bad_tolerance_is_a_usage_error(committed, tmp_path, fake_mnist):
    spec, out = copy_of(committed, tmp_path)
    r = check(spec, out, fake_mnist, "--tolerance", "0")
    assert r.exit_code == 2 and "--tolerance" in r.output and "Traceback" not in r.output
