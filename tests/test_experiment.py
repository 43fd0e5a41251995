import json
import shutil

import pytest
from click.testing import CliRunner

from gradlab.cli import cli
from gradlab.experiment import SpecError, load_spec

TINY = """
# a tiny spec for the tests
description = "tiny"

[[sweep]]
depth = [2, 3]
width = 8
activation = ["sigmoid", "relu"]
epochs = 1
train_size = 256
seed = [0, 1]

[figures]
formats = ["png", "svg"]
"""


def write(tmp_path, text, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def build(spec, out, data):
    return CliRunner().invoke(cli, ["figures", str(spec), "--out", str(out), "--data-dir",
                                    str(data)], catch_exceptions=False)


def outputs(out):
    files = sorted(p for p in out.rglob("*") if p.is_file() and "runs" not in p.parts
                   and p.name != "manifest.json")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


@pytest.mark.slow  # an experiment built twice
def test_rebuild_after_delete_gives_identical_bytes(tmp_path, fake_mnist):
    spec = write(tmp_path, TINY)
    out = tmp_path / "results" / "tiny"
    r = build(spec, out, fake_mnist)
    assert r.exit_code == 0, r.output
    first = outputs(out)
    assert {"summary.csv", "summary.md", "figures/grad_norm_by_layer.png",
            "figures/grad_norm_by_layer.svg"} <= set(first)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["runs"]) == 8 and set(manifest["statuses"].values()) == {"complete"}
    assert all(f["records_sha256"] == manifest["records_sha256"]
               for f in manifest["figures"].values())
    assert manifest["figures"]["figures/grad_norm_by_layer.png"]["sha256"]
    shutil.rmtree(out)
    r = build(spec, out, fake_mnist)
    assert r.exit_code == 0, r.output
    assert outputs(out) == first
    again = json.loads((out / "manifest.json").read_text())
    assert again["records_sha256"] == manifest["records_sha256"]
    assert again["figures"] == manifest["figures"]


@pytest.mark.parametrize("text, needle", [
    ("[[sweep]]\ndepth = [3\n", "malformed TOML"),
    ("colour = 1\n[[sweep]]\ndepth = 3\n", "unknown key 'colour'"),
    ("description = 'x'\n", "at least one [[sweep]]"),
    ("[[sweep]]\ndepht = 3\n", "depht"),
    ("[[sweep]]\ndepth = '3'\n", "depth"),
    ("[[sweep]]\ndepth = []\n", "empty list"),
    ("[[sweep]]\ndepth = 3\nwidths = [1, 2, 3]\n", "widths"),
    ("[[sweep]]\nlr = -1.0\n", "lr"),
    ("[[sweep]]\nactivation = 'swish'\n", "activation"),
    ("[[sweep]]\ndepth = 3\n[figures]\nonly = ['nope']\n", "figures.only"),
    ("[[sweep]]\ndepth = 3\n[figures]\nformats = ['gif']\n", "figures.formats"),
    ("[[sweep]]\ndepth = 3\n[figures]\ncolor = 1\n", "figures.color"),
    ("sweep = 3\n", "at least one [[sweep]]"),
])
def test_bad_specs_are_one_line_errors(tmp_path, text, needle):
    spec = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)
    r = CliRunner().invoke(cli, ["figures", str(spec), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_missing_spec_file(tmp_path):
    r = CliRunner().invoke(cli, ["figures", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "nope.toml" in r.output


def test_shipped_experiments_parse():
    from pathlib import Path

    specs = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))
    assert {p.stem for p in specs} >= {"tutorial", "vanishing", "init", "exploding"}
    for spec in specs:
        experiment = load_spec(spec)
        assert experiment.configs() and experiment.description
        assert "gradlab figures experiments/" in spec.read_text()


def test_a_spec_may_name_an_engine(tmp_path):
    """The engine is part of each run's config: a spec that names one gets its own run ids."""
    plain = load_spec(write(tmp_path, TINY)).configs()
    fused = load_spec(write(tmp_path, TINY.replace("epochs = 1", 'epochs = 1\nengine = "fused"'),
                            "fused.toml")).configs()
    assert {c.engine for c in plain} == {"autograd"} and {c.engine for c in fused} == {"fused"}
    assert not {c.run_id() for c in plain} & {c.run_id() for c in fused}
    with pytest.raises(SpecError, match="engine='jit' is invalid: one of autograd, fused"):
        load_spec(write(tmp_path, TINY.replace("epochs = 1", 'epochs = 1\nengine = "jit"'),
                        "bad.toml"))
