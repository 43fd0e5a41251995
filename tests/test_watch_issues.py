"""The recorder's failures on users' own models (issue 14), exact norms at the extreme (issue 17)
and applied_update_ratio (issue 16), each against an independent computation; the README's
"Record your own model" block, executed."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F

import gradlab
from gradlab import record
from gradlab.config import make_config
from gradlab.models import build_mlp
from gradlab.train import train

from .test_watch import OUT, Encoder, HeadFirst


def one_step(rec, model, opt, x, y):
    """The explicit per-step protocol, for one recorded step 0."""
    assert rec.begin_step(0)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    rec.after_backward(loss)
    opt.step()
    rec.after_update()
    return rec.flush(epoch=1)


def test_head_registered_before_body_is_numbered_by_forward_order():
    torch.manual_seed(0)
    model = HeadFirst()
    x, y = torch.randn(8, 12), torch.randint(0, OUT, (8,))
    z = model.body[0](x).detach().requires_grad_()
    (fp,) = torch.autograd.grad(torch.tanh(z).sum(), z)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record.GradientRecorder(model, "tanh", [0], optimizer=opt) as rec:
        frame = one_step(rec, model, opt, x, y)
    assert list(frame["layer_name"]) == ["body.0", "head"]
    assert frame.iloc[0]["act_grad_mean"] == pytest.approx(fp.mean().item(), rel=1e-5)
    assert np.isnan(frame.iloc[1][["act_grad_mean", "saturated_frac"]].astype(float)).all()


def test_attention_out_proj_leaves_only_its_own_columns_empty():
    torch.manual_seed(0)
    model = Encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 12), torch.randint(0, OUT, (4,))
    with record.GradientRecorder(model, {"enc.linear1": "relu"}, [0], optimizer=opt) as rec:
        frame = one_step(rec, model, opt, x, y).set_index("layer_name")
    out_proj = frame.loc["enc.self_attn.out_proj"]
    assert np.isnan(out_proj["grad_output_norm"])
    params = ["grad_weight_norm", "grad_bias_norm", "weight_norm", "update_ratio"]
    assert np.isfinite(out_proj[params].astype(float)).all()
    others = frame.drop(index="enc.self_attn.out_proj")
    assert np.isfinite(others["grad_output_norm"]).all()
    assert np.isfinite(frame.loc["enc.linear1", ["act_grad_mean", "dead_frac"]].astype(float)).all()


@pytest.mark.parametrize("split", ["biases first", "per layer"])
def test_update_ratio_uses_each_parameter_groups_lr(split):
    torch.manual_seed(0)
    model = build_mlp((12, 8, OUT), "sigmoid")
    if split == "biases first":  # the weights' group is not the first one
        groups = [{"params": [model.fc0.bias, model.fc1.bias], "lr": 0.1},
                  {"params": [model.fc0.weight, model.fc1.weight], "lr": 0.01}]
    else:
        groups = [{"params": model.fc0.parameters(), "lr": 0.1},
                  {"params": model.fc1.parameters(), "lr": 0.01}]
    opt = torch.optim.SGD(groups)
    before = [m.weight.detach().clone() for m in (model.fc0, model.fc1)]
    x, y = torch.randn(8, 12), torch.randint(0, OUT, (8,))
    with record.GradientRecorder(model, "sigmoid", [0], optimizer=opt) as rec:
        frame = one_step(rec, model, opt, x, y)
    for layer, m in enumerate((model.fc0, model.fc1)):
        applied = (m.weight.detach() - before[layer]).norm() / before[layer].norm()
        assert frame.iloc[layer]["update_ratio"] == pytest.approx(applied.item(), rel=1e-4)


def test_unknown_activation_is_one_line_listing_the_known_ones():
    model = build_mlp((12, 8, OUT), "relu")
    for spec in ("mish", {"fc0": "mish"}):
        with pytest.raises(ValueError) as info:
            record.GradientRecorder(model, spec, [0])
        message = str(info.value)
        assert "\n" not in message and "'mish'" in message and "sigmoid, tanh, relu" in message


def test_recorder_exported_and_watch_saves_a_run(tmp_path):
    assert gradlab.GradientRecorder is record.GradientRecorder
    assert {"watch", "GradientRecorder"} <= set(gradlab.__all__)
    torch.manual_seed(0)
    model = build_mlp((12, 8, OUT), "relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 12), torch.randint(0, OUT, (8,))
    with gradlab.watch(model, opt, log_every=2) as rec:
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    first = rec.flush()
    path = rec.save(tmp_path / "mine", name="run-a", config={"lr": 0.1, "note": None})
    assert path == tmp_path / "mine" / "runs" / "run-a"
    grads = pq.read_table(path / "grads.parquet").to_pandas()
    assert list(grads.columns) == ["run_id", "step", "epoch", "layer", "layer_name",
                                   *record.COLUMNS]
    assert (grads["run_id"] == "run-a").all() and len(grads) == len(first) == 6
    assert sorted(grads["step"].unique()) == [0, 2, 4] and (grads["epoch"] == 1).all()

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))

    meta = strict((path / "config.json").read_text())
    assert meta["source"] == "watch" and meta["run_id"] == "run-a"
    assert meta["config"] == {"lr": 0.1, "note": None}  # the user's, whole
    assert meta["watched"]["optimizers"][0]["type"] == "SGD"
    assert meta["watched"]["layers"] == [
        {"layer": 0, "layer_name": "fc0", "type": "Linear", "shape": [8, 12],
         "activation": "relu"},  # (the activation known after it; none after the output)
        {"layer": 1, "layer_name": "fc1", "type": "Linear", "shape": [OUT, 8],
         "activation": None}]
    assert strict((path / "status.json").read_text())["status"] == "complete"
    for bad in ({"lr": [1]}, {1: 2}):
        with pytest.raises(ValueError, match="invalid"):
            rec.save(tmp_path / "mine", name="run-b", config=bad)
    with pytest.raises(ValueError, match="name='../x' is invalid"):
        rec.save(tmp_path / "mine", name="../x")


def test_a_watched_run_carries_the_digests_of_a_trained_run(tmp_path):
    """Watch.save writes through the store's one run writer: status.json holds every file's
    sha256, so a byte changed later is named as damage, as for a run gradlab trained."""
    from gradlab import store
    from gradlab.validate import check_run

    model = build_mlp((12, 8, OUT), "relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, OUT, (8,))).backward()
        opt.step()
    path = rec.save(tmp_path, name="watched")
    status = json.loads((path / "status.json").read_text())
    assert set(status["sha256"]) >= {"config.json", "grads.parquet", "epochs.parquet"}
    assert store.is_complete(tmp_path, "watched")
    data = bytearray((path / "grads.parquet").read_bytes())
    data[len(data) // 2] ^= 1
    (path / "grads.parquet").write_bytes(bytes(data))
    assert any("grads.parquet" in p for p in check_run(path)[1])



def test_norms_exact_below_float32_square_underflow():
    """Depth 32, width 16 sigmoid: the first layers' gradients are far below 1e-19, where
    float32 squares underflow; every norm equals the float64 norm of the same gradients."""
    torch.manual_seed(0)
    model = build_mlp((784,) + (16,) * 31 + (10,), "sigmoid")
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record.GradientRecorder(model, "sigmoid", [0], optimizer=opt) as rec:
        assert rec.begin_step(0)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.after_backward(loss)
        grads = [m.weight.grad.clone() for m in rec.linears]
        bias = [m.bias.grad.clone() for m in rec.linears]
        weights = np.array([m.weight.double().norm().item() for m in rec.linears])
        opt.step()
        rec.after_update()
        frame = rec.flush()
    exact = np.array([g.double().norm().item() for g in grads])
    assert exact[0] < 1e-25 and (exact > 0).all()  # the regime where float32 squares vanish
    assert torch.stack([g.norm() for g in grads])[0] == 0  # ...as a float32 norm shows
    np.testing.assert_allclose(frame["grad_weight_norm"], exact, rtol=1e-6)
    np.testing.assert_allclose(frame["grad_bias_norm"], [b.double().norm().item() for b in bias],
                               rtol=1e-6)
    np.testing.assert_allclose(frame["update_ratio"], 0.1 * exact / weights, rtol=1e-6)
    assert (frame["update_ratio"] > 0).all()


def test_exact_norms_at_the_float32_extremes():
    tiny = torch.full((1000,), 1.4e-45)  # the smallest positive float32
    huge = torch.full((4,), 1e30)
    mixed = torch.tensor([3e-20, 4e-20])
    got = record.exact_norms([tiny, huge, None, mixed])
    assert np.isnan(got[2])
    for tensor, norm in zip([tiny, huge, None, mixed], got, strict=True):
        if tensor is not None:
            assert norm == pytest.approx(tensor.double().norm().item(), rel=1e-7)


def test_applied_update_ratio_against_a_weight_snapshot(tiny_data):
    """Where lr·g lies below float32 spacing, the applied change is smaller than intended."""
    torch.manual_seed(0)
    model = build_mlp((784, 16, 10), "sigmoid")
    with torch.no_grad():
        model.fc0.weight.mul_(1e4)  # large weights: coarse float32 spacing
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = tiny_data.train.x[:32], tiny_data.train.y[:32]
    before = [m.weight.detach().clone() for m in (model.fc0, model.fc1)]
    with gradlab.watch(model, opt, log_every=1, applied_updates=True) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        intended = [0.001 * m.weight.grad.double().norm().item() for m in (model.fc0, model.fc1)]
        opt.step()
    frame = rec.flush()
    for layer, m in enumerate((model.fc0, model.fc1)):
        delta = (m.weight.detach().double() - before[layer].double()).norm()
        norm = before[layer].double().norm().item()
        row = frame.iloc[layer]
        assert row["applied_update_ratio"] == pytest.approx(delta.item() / norm, rel=1e-6)
        assert row["update_ratio"] == pytest.approx(intended[layer] / norm, rel=1e-6)
    assert frame.iloc[0]["applied_update_ratio"] < 0.9 * frame.iloc[0]["update_ratio"]


def test_train_records_applied_updates_on_request_and_keeps_run_ids(tiny_data):
    base = dict(depth=3, width=16, epochs=1, batch_size=64, train_size=128)
    off = make_config(**base)
    on = make_config(**base, applied_updates=True)
    assert "applied_updates" not in json.dumps(off.run_id()) and off.run_id() != on.run_id()
    assert off.run_id() == make_config(**base, applied_updates=False).run_id()
    a, b = train(off, data=tiny_data, device="cpu"), train(on, data=tiny_data, device="cpu")
    assert a.grads["applied_update_ratio"].isna().all()
    assert list(a.grads["layer_name"].unique()) == ["fc0", "fc1", "fc2"]
    ratio = b.grads["applied_update_ratio"] / b.grads["update_ratio"]
    assert ratio.between(0.99, 1.01).all()  # float32 rounding of ordinary updates is small
    same = [c for c in a.grads.columns if c != "applied_update_ratio"]
    assert a.grads[same].equals(b.grads[same])  # recording it changes nothing else


def test_readme_block_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Record your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    frame = scope["frame"]
    assert list(frame["layer_name"].unique()) == ["0", "3"]
    assert sorted(frame["step"].unique()) == [0, 10, 20]
    assert frame.loc[frame["layer_name"] == "0", "dead_frac"].notna().all()
    assert (tmp_path / "results/mine/runs/cnn-adamw/status.json").is_file()


@pytest.mark.parametrize("settings", [
    dict(weight_decay=0.05), dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.05),
    dict(momentum=0.9, nesterov=True), dict(momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(momentum=0.5, dampening=0.3), dict(momentum=0.9, maximize=True)])
def test_sgd_update_ratio_with_every_setting(settings):
    torch.manual_seed(0)
    model = build_mlp((12, 8, OUT), "relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **settings)
    x, y = torch.randn(3, 8, 12), torch.randint(0, OUT, (3, 8))
    with gradlab.watch(model, opt, log_every=1) as rec:
        for step in range(3):
            before = [m.weight.detach().double().clone() for m in (model.fc0, model.fc1)]
            opt.zero_grad()
            F.cross_entropy(model(x[step]), y[step]).backward()
            opt.step()
            frame = rec.flush()
            for layer, m in enumerate((model.fc0, model.fc1)):
                applied = (m.weight.detach().double() - before[layer]).norm() / before[layer].norm()
                assert frame.iloc[layer]["update_ratio"] == pytest.approx(applied.item(),
                                                                          rel=1e-4)
