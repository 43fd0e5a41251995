"""``rec.log``: the user's metrics of a watched run, at the step they belong to, saved as
metrics.parquet and read back by ``gradlab.load``; the user's config whole; no silent
overwrite."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab.store import StoreError


def loop(rec, model, opt, steps, log_after_step):
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if not log_after_step:
            rec.log(loss=loss.detach())  # a 0-d tensor: read at save
        loss.backward()
        opt.step()
        if log_after_step:
            rec.log(loss=loss.item())
        losses.append(loss.item())
    return losses


def one_watched_step():
    """A Watch that recorded one step of a Linear layer, closed."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        F.mse_loss(model(torch.randn(3, 4)), torch.zeros(3, 2)).backward()
        opt.step()
    return rec


@pytest.mark.parametrize("log_after_step", [True, False])
@pytest.mark.parametrize("log_every", [1, 3])
def test_a_logged_value_belongs_to_the_step_whose_forward_it_follows(log_after_step, log_every,
                                                                      tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, opt, log_every=log_every) as rec:
        losses = loop(rec, model, opt, 7, log_after_step)
        rec.log(split="test", accuracy=0.5)  # after the last step: step 6's
    metrics = rec.metrics()
    train = metrics[metrics["split"] == "train"]
    assert train["step"].tolist() == list(range(7))
    assert train["value"].tolist() == pytest.approx(losses)
    assert metrics.iloc[-1][["step", "split", "metric"]].tolist() == [6, "test", "accuracy"]
    path = rec.save(tmp_path, name="logged", config={"model": "mlp", "batch": 8})
    grads = pq.read_table(path / "grads.parquet").to_pandas()
    for step, loss in zip(grads["step"], grads["loss"]):  # the loss column: the logged loss
        assert loss == pytest.approx(losses[step])
    assert sorted(grads["step"].unique()) == list(range(0, 7, log_every))
    results = gradlab.load(tmp_path)
    assert list(results.metrics.columns[:5]) == ["run_id", "step", "split", "metric", "value"]
    assert len(results.metrics) == 8 and (results.metrics["run_id"] == "logged").all()
    assert results.runs.iloc[0]["model"] == "mlp"  # the user's own key, whole


def test_bad_values_are_one_line_errors_and_a_name_is_not_overwritten(tmp_path):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, opt, log_every=1) as rec:
        for bad, match in (({"loss": "low"}, "log a number"),
                           ({"loss": torch.ones(3)}, "a tensor of 3 values"), ({}, "no values")):
            with pytest.raises(ValueError, match=match) as info:
                rec.log(**bad)
            assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match="split"):
            rec.log(split="", loss=1.0)
        opt.zero_grad()
        F.mse_loss(model(torch.randn(3, 4)), torch.zeros(3, 2)).backward()
        opt.step()
    rec.save(tmp_path, name="once")
    with pytest.raises(StoreError, match="already in .*overwrite=True"):
        rec.save(tmp_path, name="once")
    path = rec.save(tmp_path, name="once", overwrite=True, config={"note": "again"})
    assert json.loads((path / "config.json").read_text())["config"] == {"note": "again"}


def test_ls_shows_a_watched_run_s_own_settings_and_a_user_run_id_key_never_wins(tmp_path):
    from click.testing import CliRunner

    from gradlab.cli import cli

    rec = one_watched_step()
    rec.save(tmp_path, name="mine", config={"model": "gru", "batch": 32, "run_id": "other"})
    out = CliRunner().invoke(cli, ["ls", str(tmp_path)]).output
    assert "watched: batch=32 model=gru config_run_id=other" in out
    assert "None" not in out and "depth" not in out  # no empty MLP columns
    runs = gradlab.load(tmp_path).runs
    assert runs["run_id"].tolist() == ["mine"] and runs["config_run_id"].tolist() == ["other"]


def test_an_empty_out_a_killed_save_s_files_huge_threads_and_escapes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gradlab.cli import cli

    rec = one_watched_step()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="output folder is empty"):
        rec.save("", name="here")
    assert not (tmp_path / "runs").exists()
    stale = tmp_path / "out" / "runs" / "r" / ".grads.parquet.999.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 1000)  # what a killed save leaves
    rec.save(tmp_path / "out", name="r", config={"note": "\x1b[31mred\x1b[0m\nsecond line"})
    assert not stale.exists()
    out = CliRunner().invoke(cli, ["ls", str(tmp_path / "out")]).output
    assert "\x1b" not in out and "\\x1b[31mred" in out and "second line" not in out
    bad = CliRunner().invoke(cli, ["sweep", "--threads", "100000", "--out", "x"])
    assert bad.exit_code == 2 and "100000" in bad.output and "Traceback" not in bad.output
