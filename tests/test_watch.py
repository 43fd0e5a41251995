"""``gradlab.watch`` on models of every shape against an independent reference: an explicit
``torch.autograd.grad`` w.r.t. each module's outputs and parameters, f' from z by autograd, the
update from weight snapshots."""

import contextlib
import copy
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab import record
from gradlab.activations import ACTIVATIONS, SATURATION
from gradlab.models import build_mlp
from gradlab.record import COLUMNS

IN, OUT, BATCH = 12, 5, 6


class ListMLP(nn.Module):
    """An MLP in an ``nn.ModuleList`` with its own forward (relu applied functionally)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(IN, 10), nn.Linear(10, 8), nn.Linear(8, OUT)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class HeadFirst(nn.Module):
    """The head is registered before the body it follows."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(9, OUT)
        self.body = nn.Sequential(nn.Linear(IN, 9), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2)])
        self.out = nn.Linear(8, OUT)

    def forward(self, x):
        h = F.relu(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class Encoder(nn.Module):
    """A TransformerEncoderLayer and a head on the mean over tokens."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(IN, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class Shared(nn.Module):
    """One Linear applied twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, OUT)

    def forward(self, x):
        h = torch.sigmoid(self.inp(x))
        h = torch.sigmoid(self.shared(h))
        return self.out(torch.sigmoid(self.shared(h)))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, OUT))


# name: (make model, input shape, activations given to watch, modules, the true activations)
MODELS = {
    "build_mlp": (lambda: build_mlp((IN, 10, 8, OUT), "tanh"), (IN,), None, None,
                  {"fc0": "tanh", "fc1": "tanh"}),
    "modulelist": (ListMLP, (IN,), {"layers.0": "relu", "layers.1": "relu"}, None,
                   {"layers.0": "relu", "layers.1": "relu"}),
    "head_first": (HeadFirst, (IN,), None, None, {"body.0": "tanh"}),
    "cnn": (cnn, (1, 8, 8), None, (nn.Conv2d, nn.Linear), {"0": "relu", "2": "tanh"}),
    "residual": (Residual, (IN,), {"inp": "relu"}, None,
                 {"inp": "relu", "blocks.0.0": "gelu", "blocks.1.0": "gelu"}),
    "encoder": (Encoder, (4, IN), {"enc.linear1": "relu"}, None, {"enc.linear1": "relu"}),
    "shared": (Shared, (IN,), {"inp": "sigmoid", "shared": "sigmoid"}, None,
               {"inp": "sigmoid", "shared": "sigmoid"}),
}


def sgd(model):
    """Two parameter groups (lr 0.1 with weight decay, lr 0.02), momentum, Nesterov."""
    params = list(model.parameters())
    half = len(params) // 2
    return torch.optim.SGD([{"params": params[:half], "weight_decay": 1e-2},
                            {"params": params[half:], "lr": 0.02}],
                           lr=0.1, momentum=0.9, nesterov=True)


OPTIMIZERS = {"sgd": sgd, "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)}


def reference(model, names, kinds, activations, x, y):
    """Per recorded module, in order of first call: its statistics without the recorder."""
    modules = dict(model.named_modules())
    outputs, order = defaultdict(list), []

    def keep(name):
        def hook(module, inputs, z):
            outputs[name].append(z)
            if name not in order:
                order.append(name)
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    loss = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    zs = [z for n in names for z in outputs[n]]
    params = [p for n in names for p in (modules[n].weight, modules[n].bias)]
    grads = torch.autograd.grad(loss, zs + params)
    by_z = dict(zip(map(id, zs), grads[:len(zs)]))
    rows = {}
    for i, name in enumerate(names):
        module = modules[name]
        calls = outputs[name]
        row = {
            "grad_output_norm": (np.sqrt(sum(by_z[id(z)].double().norm().item() ** 2
                                             for z in calls)) if calls else np.nan),
            "grad_weight_norm": grads[len(zs) + 2 * i].double().norm().item(),
            "grad_bias_norm": grads[len(zs) + 2 * i + 1].double().norm().item(),
            "weight_norm": module.weight.double().norm().item(),
            "act_grad_mean": np.nan, "saturated_frac": np.nan, "dead_frac": np.nan,
            "loss": np.nan,
        }
        act = ACTIVATIONS.get(activations.get(name))
        if act is not None and calls:
            axis = -1 if isinstance(module, nn.Linear) else 1
            fps, positive = [], []
            for z in calls:
                z = z.detach().requires_grad_()
                (fp,) = torch.autograd.grad(act.module()(z).sum(), z)
                fps.append(fp.reshape(-1))
                unit_first = z.detach().movedim(axis, 0).reshape(z.shape[axis], -1)
                positive.append((unit_first > 0).any(1))
            fp = torch.cat(fps).double()
            row["act_grad_mean"] = fp.mean().item()
            if act.saturating:
                saturated = fp < SATURATION * act.max_derivative
                row["saturated_frac"] = saturated.double().mean().item()
            if act.relu_family:
                row["dead_frac"] = (~torch.stack(positive).any(0)).double().mean().item()
        rows[name] = row
    never = [n for n in names if n not in order]
    return [(n, rows[n]) for n in order + never]


def recorded_names(model, modules):
    kinds = modules or nn.Linear
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def check_frame(frame, expected, ratios):
    assert list(frame.columns) == ["step", "epoch", "layer", "layer_name", *COLUMNS]
    assert list(frame["layer_name"]) == [name for name, _ in expected]
    assert list(frame["layer"]) == list(range(len(expected)))
    for (name, row), (_, got) in zip(expected, frame.iterrows(), strict=True):
        for column, value in {**row, **ratios[name]}.items():
            if np.isnan(value):
                assert np.isnan(got[column]), (name, column, got[column])
            else:
                assert got[column] == pytest.approx(value, rel=2e-4, abs=1e-8), (name, column)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kind", MODELS)
def test_every_column_matches_the_reference(kind, optimizer):
    make, shape, given, modules, truth = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    opt = OPTIMIZERS[optimizer](model)
    names = recorded_names(model, modules)
    weights = {n: m.weight for n, m in model.named_modules() if n in names}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, *shape, generator=g), torch.randint(0, OUT, (BATCH,),
                                                                      generator=g))
               for _ in range(3)]
    frames = []
    twin = copy.deepcopy(model)  # without the recorder's hooks, for the reference
    with gradlab.watch(model, opt, log_every=1, activations=given, modules=modules,
                       applied_updates=True) as rec:
        for x, y in batches:  # the user's loop, unmodified
            twin.load_state_dict(model.state_dict())
            expected = reference(twin, names, modules, truth, x, y)
            before = {n: w.detach().clone() for n, w in weights.items()}
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ratios = {}
            for n, w in weights.items():
                delta = (w.detach().double() - before[n].double()).norm() / before[n].norm()
                ratios[n] = {"update_ratio": delta.item(), "applied_update_ratio": delta.item()}
            frames.append((expected, ratios, rec.flush()))
    for step, (expected, ratios, frame) in enumerate(frames):
        assert (frame["step"] == step).all() and (frame["epoch"] == step + 1).all()
        check_frame(frame, expected, ratios)


def test_unrecorded_steps_run_without_hooks_and_steps_count_optimizer_steps():
    torch.manual_seed(0)
    model = build_mlp((IN, 8, OUT), "relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    with gradlab.watch(model, opt, log_every=3) as rec:
        for step in range(7):
            out = model(x)
            recorded = step % 3 == 0
            assert bool(out._backward_hooks) == recorded
            assert any(m._forward_hooks for m in model.modules()) == recorded
            # an unrecorded step runs one hook of watch's: the step post-hook, counting steps
            assert bool(model._forward_pre_hooks) == recorded
            assert len(opt._optimizer_step_pre_hooks) == recorded
            assert len(opt._optimizer_step_post_hooks) == 1
            with torch.no_grad():  # an evaluation pass opens no step
                model(x)
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            opt.step()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert sorted(rec.flush()["step"].unique()) == [0, 3, 6]


def test_gradients_are_recorded_before_clipping():
    torch.manual_seed(0)
    model = build_mlp((IN, 8, OUT), "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), [model.fc0.weight])
    before = model.fc0.weight.detach().clone()
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
    row = rec.flush().iloc[0]
    assert row["grad_weight_norm"] == pytest.approx(grads[0].norm().item(), rel=1e-5)
    applied = (model.fc0.weight.detach() - before).norm() / before.norm()
    assert row["update_ratio"] == pytest.approx(applied.item(), rel=1e-3)  # the clipped step


def test_gradient_accumulation_is_one_step():
    torch.manual_seed(0)
    model = build_mlp((IN, 8, OUT), "sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = torch.randn(2, BATCH, IN), torch.randint(0, OUT, (2, BATCH))
    total = sum(F.cross_entropy(model(x), y) for x, y in zip(xs, ys))
    (expected,) = torch.autograd.grad(total, [model.fc1.weight])
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        for x, y in zip(xs, ys):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    frame = rec.flush()
    assert len(frame) == 2
    assert frame.iloc[1]["grad_weight_norm"] == pytest.approx(expected.norm().item(), rel=1e-5)


def test_modules_by_name_predicate_and_bad_filters():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gradlab.watch(model, opt, modules=lambda name: name in ("2", "5"))
    assert rec.recorder.names == ["2", "5"]
    with pytest.raises(ValueError, match="nn.Linear, nn.Conv1d, nn.Conv2d"):
        gradlab.watch(model, opt, modules=nn.ReLU)
    with pytest.raises(ValueError, match="no module to record"):
        gradlab.watch(nn.Sequential(nn.ReLU()), opt)
    with pytest.raises(ValueError, match="not a recorded module: one of 0, 2, 5"):
        gradlab.watch(model, opt, modules=(nn.Conv2d, nn.Linear), activations={"1": "relu"})
    with pytest.raises(ValueError, match="not a torch.optim optimizer"):
        gradlab.watch(model, object())


def test_flush_at_epoch_ends_numbers_epochs_and_keeps_a_step_in_progress():
    torch.manual_seed(0)
    model = build_mlp((IN, 8, OUT), "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    frames = []
    with gradlab.watch(model, opt, log_every=1) as rec:
        for _epoch in range(2):
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            frames.append(rec.flush())
        loss = F.cross_entropy(model(x), y)  # a step begun before a flush...
        assert len(rec.flush()) == 0
        loss.backward()
        opt.step()  # ...is recorded whole by the next one
        frames.append(rec.flush())
    assert [sorted(f["step"].unique()) for f in frames] == [[0, 1], [2, 3], [4]]
    assert [f["epoch"].unique().tolist() for f in frames] == [[1], [2], [4]]
    assert frames[2]["grad_output_norm"].notna().all()


@pytest.mark.parametrize("kind", ["cnn", "encoder", "shared"])
def test_watching_does_not_change_training(kind):
    make, shape, given, modules, _ = MODELS[kind]
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(BATCH, *shape, generator=g),
                torch.randint(0, OUT, (BATCH,), generator=g)) for _ in range(3)]

    def trained(watched):
        torch.manual_seed(0)
        model = make()
        opt = sgd(model)
        with (gradlab.watch(model, opt, log_every=1, activations=given, modules=modules,
                            applied_updates=True) if watched else contextlib.nullcontext()):
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(trained(True), trained(False), strict=True):
        assert torch.equal(a, b)


def test_figure_functions_draw_a_watch_frame():
    from gradlab import plots

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, OUT))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    with gradlab.watch(model, opt, log_every=2) as rec:
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    frame = rec.flush()
    for figure in (plots.grad_norm_by_layer, plots.act_grad_by_layer,
                   plots.grad_norm_over_steps, plots.saturation_over_steps):
        assert figure(frame).axes


def _one_step_with_flushes(flush_at: set[str]) -> pd.DataFrame:
    """One recorded step of the relu CNN, flushing (and discarding) at the named moments."""
    torch.manual_seed(0)
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(BATCH, 1, 8, 8), torch.randint(0, OUT, (BATCH,))
    with gradlab.watch(model, opt, log_every=1, modules=(nn.Conv2d, nn.Linear)) as rec:
        loss = F.cross_entropy(model(x), y)
        if "after forward" in flush_at:
            assert len(rec.flush()) == 0
        loss.backward()
        if "after backward" in flush_at:
            assert len(rec.flush()) == 0
        opt.step()
    return rec.flush().drop(columns="epoch")


@pytest.mark.parametrize("moment", ["after forward", "after backward"])
def test_a_flush_inside_a_step_keeps_what_the_step_recorded_so_far(moment):
    """f' counts taken in the forward pass and norms read as the backward pass ends stay with
    their step when a flush comes between them and the optimizer step."""
    whole = _one_step_with_flushes(set())
    assert whole[["grad_output_norm", "grad_weight_norm"]].notna().all().all()
    assert whole["act_grad_mean"].notna().tolist() == [True, True, False]  # relu, tanh, output
    assert whole["dead_frac"].notna().tolist() == [True, False, False]
    pd.testing.assert_frame_equal(_one_step_with_flushes({moment}), whole)


def test_without_autograd_s_final_callbacks_gradients_are_read_at_the_step(monkeypatch):
    """Where torch cannot run a callback as the backward pass ends, the norms are taken at the
    optimizer step (after any clipping, as the module docstring says) and nothing is lost."""
    from gradlab import compat

    monkeypatch.setattr(compat, "at_backward_end", lambda callback: False)
    torch.manual_seed(0)
    model = build_mlp((IN, 8, OUT), "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        clipped = model.fc0.weight.grad.norm().item()
        opt.step()
    frame = rec.flush()
    assert frame[list(COLUMNS[:4])].notna().all().all()
    assert frame.iloc[0]["grad_weight_norm"] == pytest.approx(clipped, rel=1e-5)


def test_the_backward_pass_reads_each_gradient_once(monkeypatch):
    """One read per backward pass, queued by the first hook (not one per layer): a callback
    queued once, which queues the read once more to run after DistributedDataParallel's."""
    from gradlab import compat
    from gradlab.record.recorder import GradientRecorder

    torch.manual_seed(0)
    model = build_mlp((IN, 8, 8, OUT), "relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    queued, reads = [], []
    real = compat.at_backward_end
    monkeypatch.setattr(compat, "at_backward_end",
                        lambda callback: queued.append(callback) or real(callback))
    read = GradientRecorder.read_gradients
    monkeypatch.setattr(GradientRecorder, "read_gradients",
                        lambda self: reads.append(1) or read(self))
    with gradlab.watch(model, opt, log_every=1) as rec:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert len(queued) == 2 * 3 and len(reads) == 3
    assert rec.flush()[list(COLUMNS[:4])].notna().all().all()


def test_update_ratio_follows_a_learning_rate_schedule():
    """The update plan is rebuilt when a group's settings change: each step's update_ratio
    is read with the lr that step used."""
    torch.manual_seed(0)
    model = build_mlp((IN, 8, OUT), "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    applied = []
    with gradlab.watch(model, opt, log_every=1) as rec:
        for _ in range(3):
            before = model.fc0.weight.detach().clone()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            schedule.step()
            applied.append(((model.fc0.weight.detach() - before).norm() / before.norm()).item())
    frame = rec.flush()
    got = frame[frame["layer_name"] == "fc0"].sort_values("step")["update_ratio"].tolist()
    assert got == pytest.approx(applied, rel=1e-4)


def test_relu_counts_under_bfloat16_autocast():
    """Under ``torch.autocast`` a Linear's z is bfloat16: the f′ counts are still exact (the
    flags are float32), equal to counting z > 0 directly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, OUT))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))
    seen = []
    model[0].register_forward_hook(lambda m, i, z: seen.append(z.detach().clone()))
    with gradlab.watch(model, opt, log_every=1) as rec, \
            torch.autocast("cpu", dtype=torch.bfloat16):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    (z,) = seen
    assert z.dtype == torch.bfloat16
    row = rec.flush().iloc[0]
    assert row["act_grad_mean"] == (z > 0).sum().item() / z.numel()
    assert row["dead_frac"] == pytest.approx(((z > 0).sum(0) == 0).float().mean().item())


@pytest.mark.parametrize("kind", ["modulelist", "cnn", "residual", "encoder"])
def test_every_column_matches_the_reference_without_the_count_kernel(kind, monkeypatch):
    """The relu-family counts by PyTorch ops (no numba, or a tensor the kernel declines)."""
    monkeypatch.setattr(record, "USE_KERNELS", False)
    test_every_column_matches_the_reference(kind, "sgd")
