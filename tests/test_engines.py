"""``--engine fused`` against ``--engine autograd``: the same runs, records equal to rounding."""

import dataclasses
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gradlab
from gradlab.cli import cli
from gradlab.config import ConfigError, make_config
from gradlab.experiment import load_spec
from gradlab.train import train

from . import helpers

ROOT = Path(__file__).resolve().parent.parent
NORMS = ("grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm",
         "update_ratio", "act_grad_mean", "loss")

invoke = partial(helpers.invoke, catch_exceptions=False)


@pytest.mark.parametrize("options", [
    dict(activation="sigmoid"), dict(activation="relu", init="kaiming_normal"),
    dict(activation="tanh", momentum=0.9), dict(activation="gelu", clip_grad_norm=0.5),
    dict(activation="relu", log_every=3, log_spaced=True),
])
def test_train_engines_agree(tiny_data, options):
    config = make_config(depth=3, widths=(24, 16), epochs=2, batch_size=32, lr=0.1, **options)
    ref = train(config, data=tiny_data, device="cpu")
    fast = train(dataclasses.replace(config, engine="fused"), data=tiny_data, device="cpu")
    assert ref.status == fast.status == "complete"
    assert fast.grads[["step", "epoch", "layer"]].equals(ref.grads[["step", "epoch", "layer"]])
    for column in NORMS:
        np.testing.assert_allclose(fast.grads[column], ref.grads[column], rtol=2e-4, atol=1e-7,
                                   err_msg=column)
    for column in ("saturated_frac", "dead_frac"):
        np.testing.assert_allclose(fast.grads[column], ref.grads[column], atol=0.02,
                                   err_msg=column)
    np.testing.assert_allclose(fast.epochs["loss"], ref.epochs["loss"], rtol=1e-4)
    np.testing.assert_allclose(fast.epochs["accuracy"], ref.epochs["accuracy"], atol=0.02)


def test_config_refuses_an_unknown_engine():
    with pytest.raises(ConfigError, match="engine='jit' is invalid: one of autograd, fused"):
        make_config(depth=2, widths=(8,), epochs=1, engine="jit")


def test_engine_is_part_of_the_run_id_only_when_not_the_default():
    """Configs made before the engine field keep their ids; a fused run gets its own."""
    config = make_config(depth=3, widths=(24, 16), epochs=2)
    assert config.run_id() == make_config(depth=3, widths=(24, 16), epochs=2,
                                           engine="autograd").run_id()
    assert dataclasses.replace(config, engine="fused").run_id() != config.run_id()
    # the committed experiments' runs keep the ids they were built with
    for name in ("exploding", "init", "tutorial"):
        spec = load_spec(ROOT / "experiments" / f"{name}.toml")
        manifest = json.loads((ROOT / "results" / name / "manifest.json").read_text())
        assert sorted(c.run_id() for c in spec.configs()) == manifest["runs"], name


def test_cli_engine_option_trains_and_records_provenance(fake_mnist, tmp_path):
    args = ["--depth", 3, "--widths", "16,8", "--epochs", 1, "--data-dir", fake_mnist]
    r = invoke("train", *args, "--out", tmp_path / "a", "--engine", "fused", "--quiet")
    assert r.exit_code == 0, r.output
    (run,) = (p for p in (tmp_path / "a" / "runs").iterdir() if p.is_dir())
    meta = json.loads((run / "config.json").read_text())
    assert meta["config"]["engine"] == "fused" and meta["provenance"]["threads"] == 1
    r = invoke("sweep", "--depths", "2,3", "--preset", "train", "--width", 8, "--epochs", 1,
               "--data-dir", fake_mnist, "--out", tmp_path / "b", "--engine", "fused", "--jobs", 1)
    assert r.exit_code == 0, r.output
    results = gradlab.load(tmp_path / "b")
    assert len(results.runs) == 2 and (results.runs["status"] == "complete").all()
    assert (results.runs["engine"] == "fused").all()
    bad = CliRunner().invoke(cli, ["train", *map(str, args), "--out", str(tmp_path / "c"),
                                   "--engine", "jit"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "'jit' is not one of 'autograd', 'fused'" in bad.output
