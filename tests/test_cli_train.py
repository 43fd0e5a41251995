import json
import subprocess
import sys
from functools import partial

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from gradlab.cli import cli
from gradlab.record import COLUMNS

from . import helpers
from .conftest import REAL_DATA, has_real_mnist

invoke = partial(helpers.invoke, catch_exceptions=False)


def test_train_writes_the_layout(fake_mnist, tmp_path):
    out = tmp_path / "res"
    r = invoke("train", "--depth", 3, "--widths", "16,8", "--epochs", 2, "--data-dir", fake_mnist,
               "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("complete: final test accuracy")
    (run,) = [p for p in (out / "runs").iterdir() if p.is_dir()]  # beside its lock file
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "epochs.parquet", "grads.parquet", "status.json"]
    meta = json.loads((run / "config.json").read_text())
    assert meta["config"]["widths"] == [16, 8] and meta["run_id"] == run.name
    assert {"torch", "git_sha", "device", "argv", "started", "finished"} <= set(meta["provenance"])
    grads = pq.read_table(run / "grads.parquet").to_pandas()
    assert set(COLUMNS) <= set(grads.columns) and (grads["run_id"] == run.name).all()
    steps = 2 * -(-512 // 64)
    assert len(grads) == steps * 3
    epochs = pd.read_parquet(run / "epochs.parquet")
    assert len(epochs) == 4
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "complete" and status["steps"] == steps
    # again: already complete, nothing retrained
    again = invoke("train", "--depth", 3, "--widths", "16,8", "--epochs", 2, "--data-dir",
                   fake_mnist, "--out", out)
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.parametrize("args, needle", [
    (["--depth", "0"], "--depth"),
    (["--depth", "3", "--widths", "1,2,3"], "widths"),
    (["--activation", "swish"], "--activation"),
    (["--init", "normal:abc"], "normal:X"),
    (["--bias-init", "orthogonal"], "--bias-init"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--widths", "8,,8"], "empty item"),
    (["--width", "8", "--widths", "8,8"], "both"),
])
def test_bad_input_is_one_line_no_traceback(args, needle, fake_mnist, tmp_path):
    r = CliRunner().invoke(cli, ["train", *args, "--data-dir", str(fake_mnist), "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o" / "runs").exists() or not any((tmp_path / "o" / "runs").iterdir())


def test_missing_data_names_folder_and_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(empty), "--out", str(tmp_path / "o"),
                                 "--epochs", "1"])
    assert r.exit_code == 2
    line = r.output.strip()
    assert "\n" not in line and str(empty / "MNIST" / "raw") in line
    assert "train-images-idx3-ubyte" in line and "t10k-labels-idx1-ubyte" in line
    assert not (tmp_path / "o" / "runs").exists() or not any((tmp_path / "o" / "runs").iterdir())


@pytest.mark.slow  # a real process
def test_python_dash_m_and_help_are_fast():
    r = subprocess.run([sys.executable, "-m", "gradlab", "train", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--activation" in r.stdout and "--log-every" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not has_real_mnist(), reason="real MNIST not found in $GRADLAB_DATA")
def test_real_mnist_relu_one_epoch_above_90(tmp_path):
    r = invoke("train", "--depth", 3, "--widths", "128,256", "--activation", "relu", "--epochs", 1,
               "--data-dir", REAL_DATA, "--out", tmp_path, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.output
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    status = json.loads((run / "status.json").read_text())
    assert status["final_test_accuracy"] >= 0.90


def test_train_and_sweep_store_the_same_records_for_one_config(fake_mnist, tmp_path):
    args = ["--depth", 3, "--widths", "16,8", "--epochs", 1, "--data-dir", fake_mnist]
    assert invoke("train", *args, "--out", tmp_path / "t", "--quiet").exit_code == 0
    r = invoke("sweep", "--preset", "train", "--depths", 3, "--widths", "16,8", "--epochs", 1,
               "--data-dir", fake_mnist, "--out", tmp_path / "s", "--jobs", 1)
    assert r.exit_code == 0, r.output
    (a,) = (p for p in (tmp_path / "t" / "runs").iterdir() if p.is_dir())
    (b,) = (p for p in (tmp_path / "s" / "runs").iterdir() if p.is_dir())
    assert a.name == b.name
    pd.testing.assert_frame_equal(pd.read_parquet(a / "grads.parquet"),
                                  pd.read_parquet(b / "grads.parquet"))


def test_a_warning_during_a_command_is_one_line(monkeypatch, capsys):
    """Python shows a warning with the source line that raised it; the command shows one line."""
    import warnings

    from gradlab.cli import Group, one_line_warning

    def command_that_warns(self, ctx):
        warnings.warn("the fused engine runs its eager PyTorch path\nsecond line", stacklevel=1)
        return 0

    def show(message, category, filename, lineno, file=None, line=None):
        # Python's own showwarning (pytest replaces it to collect warnings)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(Group, "invoke", command_that_warns)
    monkeypatch.setattr(warnings, "showwarning", show)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as done:
            cli.main(["ls", "."], prog_name="gradlab")
    assert done.value.code == 0
    assert capsys.readouterr().err == "Warning: the fused engine runs its eager PyTorch path\n"
    assert one_line_warning("", UserWarning, "f.py", 1) == "Warning: UserWarning\n"
