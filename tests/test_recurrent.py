"""Recurrent layers (nn.LSTM, nn.GRU) and transposed convolutions, recorded, against an
independent reference: autograd on a copy of the model, w.r.t. its output sequences and
parameters; and the gradient through time (``TimeRecorder``, time.parquet, its figure)."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gradlab
from gradlab.plots import grad_norm_through_time
from gradlab.record import GradientRecorder, TimeRecorder
from gradlab.record.layers import recorded_layers, units
from gradlab.store import TIME_COLUMNS, close_run, ensure_out, open_run
from gradlab.validate import check_run


def joint_norm(tensors) -> float:
    """sqrt of the sum of the squared norms, in float64."""
    return math.sqrt(sum(t.detach().double().square().sum().item() for t in tensors))


def matrices(module: nn.Module, kind: str) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.startswith(kind)]


def per_t(grad: torch.Tensor, axis: int) -> np.ndarray:
    """‖grad‖ at each time step (axis ``axis``), over everything else, in float64."""
    g = grad.detach().double().movedim(axis, 0)
    return g.reshape(g.shape[0], -1).norm(dim=1).numpy()


class Classifier(nn.Module):
    """embedding → LSTM → Linear on the last output."""

    def __init__(self, vocab=30, dim=8, hidden=12, classes=4, **lstm):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, **lstm)
        self.fc = nn.Linear(self.lstm.proj_size or hidden, classes)

    def parts(self, x):
        """Every tensor the reference differentiates w.r.t.: x_seq, y_seq, logits, loss-free."""
        seq = self.emb(x)
        out, _ = self.lstm(seq)
        return seq, out, self.fc(out[:, -1])

    def forward(self, x):
        return self.parts(x)[2]


class Tagger(nn.Module):
    """GRU (time-major) over real inputs → Linear at every time step."""

    def __init__(self, features=5, hidden=7, classes=3):
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=2)
        self.fc = nn.Linear(hidden, classes)

    def parts(self, x):
        out, _ = self.gru(x)
        return x, out, self.fc(out)

    def forward(self, x):
        return self.parts(x)[2]


def loss_of(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def reference(model, rnn_name, x, y):
    """Per layer (rnn, fc): the recorded columns by autograd.grad on a copy of the model; and
    the per-t norms of dL/dx and dL/dy."""
    twin = copy.deepcopy(model)
    rnn, fc = getattr(twin, rnn_name), twin.fc
    x = x.clone().requires_grad_() if x.is_floating_point() else x
    seq, out, logits = twin.parts(x)
    loss = loss_of(logits, y)
    ws, bs = matrices(rnn, "weight"), matrices(rnn, "bias")
    grads = torch.autograd.grad(loss, [seq, out, logits, *ws, *bs, fc.weight, fc.bias])
    g_seq, g_out, g_logits = grads[:3]
    g_ws, g_bs = grads[3:3 + len(ws)], grads[3 + len(ws):3 + len(ws) + len(bs)]
    axis = 1 if rnn.batch_first else 0
    rows = [
        {"grad_output_norm": joint_norm([g_out]), "grad_weight_norm": joint_norm(g_ws),
         "grad_bias_norm": joint_norm(g_bs), "weight_norm": joint_norm(ws)},
        {"grad_output_norm": joint_norm([g_logits]), "grad_weight_norm": joint_norm([grads[-2]]),
         "grad_bias_norm": joint_norm([grads[-1]]), "weight_norm": joint_norm([fc.weight])},
    ]
    return rows, loss.item(), per_t(g_seq, axis), per_t(g_out, axis)


def record(model, rnn_name, batches, optimizer, modules):
    """Record every step of ``batches`` with the explicit protocol; per step, the reference
    (taken before the step) and the update ratios measured against a weight snapshot."""
    expected = []
    names = None
    with GradientRecorder(model, None, 1, modules=modules, optimizer=optimizer) as rec, \
            TimeRecorder(model, 1, modules=modules) as times:
        for step, (x, y) in enumerate(batches):
            rows, loss_value, x_t, y_t = reference(model, rnn_name, x, y)
            assert rec.begin_step(step) and times.begin_step(step)
            loss = loss_of(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            rec.after_backward(loss)
            times.after_backward()
            layers = [getattr(model, rnn_name), model.fc]
            before = [[w.detach().clone() for w in matrices(m, "weight")] for m in layers]
            optimizer.step()
            rec.after_update()
            for row, layer, old in zip(rows, layers, before):
                now = matrices(layer, "weight")
                row["update_ratio"] = (joint_norm([a - b for a, b in zip(now, old)])
                                       / joint_norm(old))
                row["loss"] = loss_value
            expected.append((rows, x_t, y_t))
        names = [rec.names[i] for i in rec.layer_order()]
        return rec.flush(epoch=1), times.flush(1, names), expected


def check(frame, times, expected, rnn_name, input_grad=True):
    assert list(frame["layer_name"][:2]) == [rnn_name, "fc"]
    for step, (rows, x_t, y_t) in enumerate(expected):
        got = frame[frame["step"] == step].reset_index(drop=True)
        for layer, row in enumerate(rows):
            for column, value in row.items():
                assert got.loc[layer, column] == pytest.approx(value, rel=1e-5), \
                    (step, layer, column)
        t = times[times["step"] == step]
        assert (t["layer_name"] == rnn_name).all() and (t["layer"] == 0).all()
        assert list(t["t"]) == list(range(len(y_t)))
        np.testing.assert_allclose(t["grad_output_norm"], y_t, rtol=1e-6, atol=1e-30)
        if input_grad:
            np.testing.assert_allclose(t["grad_input_norm"], x_t, rtol=1e-6, atol=1e-30)
        else:
            assert t["grad_input_norm"].isna().all()


def tokens(seed, batch=6, length=9, vocab=30, classes=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, length), generator=g),
            torch.randint(0, classes, (batch,), generator=g))


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam"])
def test_lstm_classifier_matches_autograd(optimizer):
    torch.manual_seed(0)
    model = Classifier(num_layers=2)
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5),
           "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9,
                                                     weight_decay=1e-3),
           "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[optimizer](model.parameters())
    frame, times, expected = record(model, "lstm", [tokens(1), tokens(2), tokens(3)], opt,
                                    (nn.LSTM, nn.Linear))
    assert len(frame) == 6 and frame["step"].tolist() == [0, 0, 1, 1, 2, 2]
    check(frame, times, expected, "lstm")
    assert list(times.columns) == list(TIME_COLUMNS[1:])
    # the loss reads the last output only: dL/dy_t is zero before it, dL/dx_t is not
    assert (times.groupby("step")["grad_output_norm"].apply(lambda s: (s.iloc[:-1] == 0).all())
            ).all()
    assert (times["grad_input_norm"] > 0).all()


def test_gru_tagger_time_major_with_an_input_that_requires_grad():
    torch.manual_seed(1)
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(11, 4, 5, generator=g), torch.randint(0, 3, (11, 4), generator=g))
               for _ in range(2)]
    batches = [(x.requires_grad_(), y) for x, y in batches]
    frame, times, expected = record(model, "gru", batches, opt, (nn.GRU, nn.Linear))
    check(frame, times, expected, "gru")
    assert len(times) == 2 * 11


def test_an_input_without_grad_has_no_input_norms():
    torch.manual_seed(2)
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 3, 5), torch.randint(0, 3, (6, 3))
    frame, times, expected = record(model, "gru", [(x, y)], opt, (nn.GRU, nn.Linear))
    check(frame, times, expected, "gru", input_grad=False)


def test_packed_bidirectional_projected_lstm():
    """A PackedSequence in and out (its data), two directions and a projection: the norms
    against autograd w.r.t. the padded sequences (padding masked out of the loss)."""
    torch.manual_seed(3)
    lstm = nn.LSTM(4, 6, batch_first=True, bidirectional=True, proj_size=3)
    lengths = torch.tensor([7, 5, 2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, generator=g)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).float()[..., None]
    target = torch.randn(3, 7, 6, generator=g)

    def run(module, x):
        out, _ = module(pack_padded_sequence(x, lengths, batch_first=True))
        padded, _ = pad_packed_sequence(out, batch_first=True)
        return padded, (padded * mask * target).sum()

    assert [layer.units for layer in recorded_layers(lstm, nn.LSTM)] == [6] == [units(lstm)]
    twin = copy.deepcopy(lstm)
    x_ref = x.clone().requires_grad_()
    padded, loss = run(twin, x_ref)
    g_x, g_y, *g_w = torch.autograd.grad(loss, [x_ref, padded, *matrices(twin, "weight")])
    with GradientRecorder(lstm, None, 1, modules=nn.LSTM) as rec, \
            TimeRecorder(lstm, 1, modules=nn.LSTM) as times:
        rec.begin_step(0)
        times.begin_step(0)
        _, loss = run(lstm, x.clone().requires_grad_())
        loss.backward()
        rec.after_backward(loss)
        times.after_backward()
        frame, t = rec.flush(), times.flush()
    assert len(matrices(lstm, "weight")) == 6  # ih, hh, hr, both directions
    assert frame.loc[0, "grad_output_norm"] == pytest.approx(joint_norm([g_y]), rel=1e-5)
    assert frame.loc[0, "grad_weight_norm"] == pytest.approx(joint_norm(g_w), rel=1e-5)
    np.testing.assert_allclose(t["grad_input_norm"], per_t(g_x, 1), rtol=1e-6)
    np.testing.assert_allclose(t["grad_output_norm"], per_t(g_y, 1), rtol=1e-6)


def test_a_module_called_twice_is_one_layer_pooled_at_each_t():
    torch.manual_seed(4)
    gru = nn.GRU(3, 4)
    x1, x2 = torch.randn(5, 2, 3), torch.randn(3, 6, 3)
    twin = copy.deepcopy(gru)
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    y1, y2 = twin(a)[0], twin(b)[0]
    ga, gb, g1, g2 = torch.autograd.grad((y1 ** 2).sum() + y2.sum(), [a, b, y1, y2])

    def pool(first, second):
        out = per_t(first, 0) ** 2
        out[: len(per_t(second, 0))] += per_t(second, 0) ** 2
        return np.sqrt(out)

    with TimeRecorder(gru, [0], modules=nn.GRU) as times:
        times.begin_step(0)
        y1, y2 = gru(x1.requires_grad_())[0], gru(x2.requires_grad_())[0]
        ((y1 ** 2).sum() + y2.sum()).backward()
        times.after_backward()
        assert times.begin_step(1) is False  # not recorded: no hooks
        gru(x1)[0].sum().backward()
        times.after_backward()
        t = times.flush()
    assert t["step"].tolist() == [0] * 5
    np.testing.assert_allclose(t["grad_input_norm"], pool(ga, gb), rtol=1e-6)
    np.testing.assert_allclose(t["grad_output_norm"], pool(g1, g2), rtol=1e-6)


def test_hooks_only_on_recorded_steps_and_none_after_exit():
    model = Classifier()
    times = TimeRecorder(model, 2, modules=(nn.LSTM, nn.Linear))
    assert times and times.names == ["lstm"]
    with times:
        assert not times.begin_step(1) and not model.lstm._forward_hooks
        assert times.begin_step(2) and model.lstm._forward_hooks
    assert not model.lstm._forward_hooks
    assert not TimeRecorder(model, 1)  # Linear only: nothing to record
    assert len(TimeRecorder(model, 1).flush()) == 0


def conv_transpose_reference(model, x):
    """The columns of each ConvTranspose2d (then ReLU, except the last) by autograd."""
    convs = [m for m in model if isinstance(m, nn.ConvTranspose2d)]
    zs, a = [], x
    for i, m in enumerate(convs):
        z = F.conv_transpose2d(a, m.weight, m.bias, stride=m.stride, padding=m.padding)
        zs.append(z)
        a = F.relu(z) if i < len(convs) - 1 else z
    loss = (a ** 2).mean()
    grads = torch.autograd.grad(loss, zs + [p for m in convs for p in (m.weight, m.bias)])
    rows = []
    for i, m in enumerate(convs):
        row = {"grad_output_norm": joint_norm([grads[i]]),
               "grad_weight_norm": joint_norm([grads[len(convs) + 2 * i]]),
               "grad_bias_norm": joint_norm([grads[len(convs) + 2 * i + 1]]),
               "weight_norm": joint_norm([m.weight]), "loss": loss.item()}
        if i < len(convs) - 1:
            z = zs[i].detach()
            row["act_grad_mean"] = (z > 0).double().mean().item()
            row["dead_frac"] = (z <= 0).all(0).all(-1).all(-1).double().mean().item()
        rows.append(row)
    return rows


def test_conv_transpose2d_matches_autograd():
    torch.manual_seed(5)
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(5, 2, 3))
    x = torch.randn(4, 3, 6, 6)
    expected = conv_transpose_reference(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [model[i].weight.detach().clone() for i in (0, 2)]
    with GradientRecorder(model, None, 1, modules=nn.ConvTranspose2d, optimizer=opt) as rec:
        rec.begin_step(0)
        loss = (model(x) ** 2).mean()
        loss.backward()
        rec.after_backward(loss)
        opt.step()
        rec.after_update()
        frame = rec.flush()
    assert frame["layer_name"].tolist() == ["0", "2"]
    for layer, row in enumerate(expected):
        for column, value in row.items():
            assert frame.loc[layer, column] == pytest.approx(value, rel=1e-5), (layer, column)
        w = model[2 * layer].weight.detach()
        ratio = joint_norm([w - before[layer]]) / joint_norm([before[layer]])
        assert frame.loc[layer, "update_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert np.isnan(frame.loc[1, "act_grad_mean"])
    assert [units(m) for m in (model[0], model[2])] == [5, 2]


def test_conv_transpose1d_is_recordable():
    model = nn.Sequential(nn.ConvTranspose1d(2, 3, 4), nn.Tanh())
    layers = recorded_layers(model, nn.ConvTranspose1d)
    assert layers[0].axis == -2 and layers[0].units == 3
    with GradientRecorder(model, None, 1, modules=nn.ConvTranspose1d) as rec:
        rec.begin_step(0)
        z = model[0](torch.randn(2, 2, 5))
        model[1](z).sum().backward()
        rec.after_backward()
        frame = rec.flush()
    assert frame.loc[0, "grad_weight_norm"] == pytest.approx(
        joint_norm([model[0].weight.grad]), rel=1e-6)
    assert 0 < frame.loc[0, "act_grad_mean"] <= 1


def save_run(out, name, times=None):
    grads = pd.DataFrame({"step": [0], "epoch": [1], "layer": [0], "layer_name": ["lstm"],
                          "grad_weight_norm": [1.0]})
    path = open_run(ensure_out(out), name, {"source": "watch", "config": {"lr": 0.1},
                                             "provenance": {}})
    records = {"grads": grads, "epochs": pd.DataFrame(columns=["epoch", "split", "loss",
                                                               "accuracy"])}
    if times is not None:
        records["time"] = times
    close_run(path, name, records, {"steps": 1})
    return path


def test_time_round_trip_through_the_store_and_the_figure(tmp_path):
    torch.manual_seed(6)
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 5, generator=g).requires_grad_(),
                torch.randint(0, 3, (8, 3), generator=g)) for _ in range(3)]
    _, times, _ = record(model, "gru", batches, opt, (nn.GRU, nn.Linear))
    path = save_run(tmp_path, "rnn", times)
    save_run(tmp_path, "plain")  # a run without time.parquet
    assert (path / "time.parquet").exists()
    status, problems = check_run(path)
    assert problems == [] and "time.parquet" in status["sha256"]
    results = gradlab.load(tmp_path)
    assert results.problems == []
    got = results.time
    assert list(got.columns[:len(TIME_COLUMNS)]) == list(TIME_COLUMNS)
    assert (got["run_id"] == "rnn").all() and (got["lr"] == 0.1).all()
    pd.testing.assert_frame_equal(got[list(TIME_COLUMNS[1:])], times, check_dtype=False)
    assert got[["step", "layer", "t"]].dtypes.eq(np.int64).all()
    assert len(results.only(["plain"]).time) == 0
    ax = grad_norm_through_time(got)
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 3  # one per recorded step
    fig = ax.get_figure(root=True)
    fig.savefig(tmp_path / "time.png")
    ax2 = grad_norm_through_time(got, y="grad_output_norm", ax=fig.add_subplot(2, 2, 4))
    assert len(ax2.get_lines()) == 3


def test_load_without_time_has_an_empty_time_frame(tmp_path):
    save_run(tmp_path, "plain")
    time = gradlab.load(tmp_path).time
    assert time.empty and list(time.columns) == list(TIME_COLUMNS)


def test_figure_without_input_norms_says_why():
    frame = pd.DataFrame({"step": [0, 0], "layer": [0, 0], "layer_name": ["gru", "gru"],
                          "t": [0, 1], "grad_input_norm": [np.nan, np.nan],
                          "grad_output_norm": [1.0, 0.5]})
    with pytest.raises(ValueError, match="did not require grad"):
        grad_norm_through_time(frame)


def test_matrices_in_two_param_groups_and_no_biases():
    """An LSTM whose matrices two SGD groups step at different rates: its ‖ΔW‖ over all of
    them, as a weight snapshot measures it; without biases, grad_bias_norm is empty."""
    torch.manual_seed(7)
    lstm = nn.LSTM(3, 4, bias=False)
    ih, hh = matrices(lstm, "weight_ih"), matrices(lstm, "weight_hh")
    opt = torch.optim.SGD([{"params": ih, "lr": 0.5}, {"params": hh, "lr": 0.01}])
    x = torch.randn(5, 2, 3)
    before = [w.detach().clone() for w in matrices(lstm, "weight")]
    with GradientRecorder(lstm, None, 1, modules=nn.LSTM, optimizer=opt) as rec:
        rec.begin_step(0)
        lstm(x)[0].sum().backward()
        rec.after_backward()
        opt.step()
        rec.after_update()
        frame = rec.flush()
    after = matrices(lstm, "weight")
    ratio = joint_norm([a - b for a, b in zip(after, before)]) / joint_norm(before)
    assert frame.loc[0, "update_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert np.isnan(frame.loc[0, "grad_bias_norm"])
