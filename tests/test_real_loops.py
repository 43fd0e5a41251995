"""``gradlab.watch`` on the loops of real training code (issue: right or empty on every real
loop), each against an independent autograd reference on a copy of the model: a GAN with both
models watched, a gradient penalty, a validation forward with grad enabled, GradScaler with a
skipped step, LBFGS's closure, an optimizer made inside the block, two optimizers."""
# ruff: noqa: B023 (each reference's lambda is called at once, in its own loop iteration)

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab.activations import ACTIVATIONS

B = 8


def calls_of(model, names, run):
    """Run ``run()`` with ``model``'s named Linear layers' outputs z kept, per layer and call."""
    modules = dict(model.named_modules())
    zs = {n: [] for n in names}
    handles = [modules[n].register_forward_hook(lambda m, i, z, n=n: zs[n].append(z))
               for n in names]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, zs


def reference(model, run, activations=None):
    """Per Linear layer of ``model`` (by name): ‖∂L/∂z‖ over the calls whose z takes part in
    the gradient of ``L = run()`` (others: 0), the weight gradient's norm, and the mean f' of
    the named activation over those calls."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    loss, zs = calls_of(model, names, run)
    flat = [z for n in names for z in zs[n]]
    params = [dict(model.named_modules())[n].weight for n in names]
    grads = torch.autograd.grad(loss, flat + params, allow_unused=True)
    by_z = dict(zip(map(id, flat), grads[:len(flat)]))
    out = {}
    for i, n in enumerate(names):
        used = [z for z in zs[n] if by_z[id(z)] is not None]
        row = {"grad_output_norm": np.sqrt(sum(by_z[id(z)].double().norm().item() ** 2
                                                for z in used)),
               "grad_weight_norm": grads[len(flat) + i].double().norm().item()}
        act = (activations or {}).get(n)
        if act is not None:
            fps = []
            for z in used:
                z = z.detach().requires_grad_()
                (fp,) = torch.autograd.grad(ACTIVATIONS[act].module()(z).sum(), z)
                fps.append(fp.reshape(-1))
            row["act_grad_mean"] = torch.cat(fps).double().mean().item()
        out[n] = row
    return out


def check(frame, step, expected, rel=1e-5):
    rows = frame[frame["step"] == step].set_index("layer_name")
    for name, columns in expected.items():
        for column, value in columns.items():
            assert rows.loc[name, column] == pytest.approx(value, rel=rel, abs=1e-10), \
                (step, name, column)


def test_a_gan_s_two_models_each_record_only_their_own_passes():
    """DCGAN's loop: the generator's loss back-propagates through the discriminator, whose
    step must not count that pass (its gradient is zeroed before D's next step)."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    D = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-2)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2)
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(B, 1), torch.zeros(B, 1)
    expected_d, expected_g = [], []
    with gradlab.watch(D, opt_d, log_every=1) as rec_d, \
            gradlab.watch(G, opt_g, log_every=1) as rec_g:
        for _ in range(3):
            real, noise = torch.randn(B, 8), torch.randn(B, 4)
            d_ref, g_ref = copy.deepcopy(D), copy.deepcopy(G)
            expected_d.append(reference(d_ref, lambda: bce(d_ref(real), ones)
                                        + bce(d_ref(g_ref(noise).detach()), zeros), {"0": "tanh"}))
            D.zero_grad()
            bce(D(real), ones).backward()
            fake = G(noise)
            bce(D(fake.detach()), zeros).backward()
            opt_d.step()
            d_ref = copy.deepcopy(D)
            expected_g.append(reference(g_ref, lambda: bce(d_ref(g_ref(noise)), ones),
                                        {"0": "relu"}))
            G.zero_grad()
            bce(D(fake), ones).backward()
            opt_g.step()
    frame_d, frame_g = rec_d.flush(), rec_g.flush()
    for step in range(3):
        check(frame_d, step, expected_d[step])
        check(frame_g, step, expected_g[step])


def test_a_gradient_penalty_s_autograd_grad_pass_is_left_out():
    """WGAN-GP: ``torch.autograd.grad(create_graph=True)`` fires the critic's hooks; only the
    pass of ``backward`` makes its gradient (the output layer's ‖∂L/∂z‖ is √(2/B) here)."""
    torch.manual_seed(0)
    C = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(C.parameters(), lr=1e-3, betas=(0.5, 0.9))
    real, fake = torch.randn(B, 8), torch.randn(B, 8)
    alpha = torch.rand(B, 1)

    def critic_loss(critic):
        interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(interp).sum(), interp, create_graph=True)
        penalty = ((grad.norm(2, dim=1) - 1) ** 2).mean()
        return critic(fake).mean() - critic(real).mean() + 10 * penalty

    twin = copy.deepcopy(C)
    expected = reference(twin, lambda: critic_loss(twin), {"0": "tanh"})
    with gradlab.watch(C, opt, log_every=1) as rec:
        opt.zero_grad()
        critic_loss(C).backward()
        opt.step()
    frame = rec.flush()
    check(frame, 0, expected)
    assert frame.set_index("layer_name").loc["2", "grad_output_norm"] == pytest.approx(
        np.sqrt(2 / B), rel=1e-6)


def test_a_validation_forward_with_grad_enabled_does_not_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Sigmoid(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    x_val = torch.randn(B, 6) * 5
    twin = copy.deepcopy(model)
    expected = reference(twin, lambda: F.cross_entropy(twin(x), y), {"0": "sigmoid"})
    with gradlab.watch(model, opt, log_every=1) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model(x_val)  # an evaluation, grad enabled, no backward pass
        opt.step()
    check(rec.flush(), 0, expected)


def test_grad_scaler_records_the_real_loss_and_a_skipped_step_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    batches = [(torch.randn(B, 6), torch.randint(0, 3, (B,))) for _ in range(4)]
    expected, skipped = [], 0
    with gradlab.watch(model, opt, log_every=1, scaler=scaler) as rec:
        for i, (x, y) in enumerate(batches):
            twin = copy.deepcopy(model)
            reference_now = reference(twin, lambda: F.cross_entropy(twin(x), y), {"0": "tanh"})
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if i == 1:  # an overflow: the scaler skips this step and halves its scale
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            if i == 1:
                skipped += 1
            else:
                expected.append(reference_now)
    frame = rec.flush()
    assert sorted(frame["step"].unique()) == [0, 1, 2] and skipped == 1
    for step, columns in enumerate(expected):
        check(frame, step, columns)


def test_lbfgs_closure_records_the_gradient_at_the_step_s_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    expected, ratios = [], []
    with gradlab.watch(model, opt, log_every=1) as rec:
        for _ in range(2):
            twin = copy.deepcopy(model)
            expected.append(reference(twin, lambda: F.cross_entropy(twin(x), y), {"0": "tanh"}))
            before = [m.weight.detach().clone() for m in (model[0], model[2])]
            opt.step(closure)
            ratios.append({n: {"update_ratio": ((m.weight.detach() - w).norm() / w.norm()).item()}
                           for n, m, w in zip(("0", "2"), (model[0], model[2]), before)})
    frame = rec.flush()
    assert sorted(frame["step"].unique()) == [0, 1]
    for step in range(2):
        check(frame, step, expected[step])
        check(frame, step, ratios[step], rel=1e-4)


def test_an_optimizer_made_inside_the_block_is_found():
    """``watch(model)`` without an optimizer: a trainer's own optimizer, made later, is found;
    nothing is held between steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    other = nn.Linear(3, 3)
    expected = []
    with gradlab.watch(model, log_every=1) as rec:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt_other = torch.optim.SGD(other.parameters(), lr=0.1)  # steps no watched parameter
        for _ in range(3):
            twin = copy.deepcopy(model)
            expected.append(reference(twin, lambda: F.cross_entropy(twin(x), y), {"0": "relu"}))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt_other.step()
        assert not any(rec.recorder._grad_out) and not rec.recorder._passes.items
    frame = rec.flush()
    assert sorted(frame["step"].unique()) == [0, 1, 2]
    for step in range(3):
        check(frame, step, expected[step])


def test_two_optimizers_each_measure_the_layers_they_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    body = torch.optim.SGD(model[0].parameters(), lr=0.1)
    head = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    for optimizer in ([body, head], None):
        ratios = []
        with gradlab.watch(model, optimizer, log_every=1) as rec:
            for _ in range(2):
                before = [m.weight.detach().clone() for m in (model[0], model[2])]
                body.zero_grad()
                head.zero_grad()
                F.cross_entropy(model(x), y).backward()
                body.step()
                head.step()
                ratios.append({n: {"update_ratio": ((m.weight.detach() - w).norm()
                                                    / w.norm()).item()}
                               for n, m, w in zip(("0", "2"), (model[0], model[2]), before)})
        frame = rec.flush()
        assert sorted(frame["step"].unique()) == [0, 1]
        for step in range(2):
            check(frame, step, ratios[step], rel=1e-4)


def test_gradients_set_by_hand_leave_the_pass_columns_empty_with_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    with warnings.catch_warnings(record=True) as caught, \
            gradlab.watch(model, opt, log_every=1) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
    frame = rec.flush()
    assert frame["grad_output_norm"].isna().all() and frame["act_grad_mean"].isna().all()
    assert frame["grad_weight_norm"].notna().all()
    assert len([w for w in caught if "not made by a backward pass" in str(w.message)]) == 1


def test_fsdp_is_refused_in_one_line():
    class FullyShardedDataParallel(nn.Module):  # (FSDP itself needs a process group)
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

    with pytest.raises(ValueError, match="FSDP is not supported") as info:
        gradlab.watch(FullyShardedDataParallel())
    assert "\n" not in str(info.value)


def test_a_watched_lstm_saves_its_gradient_through_time(tmp_path):
    """``watch`` records an LSTM as one layer (its weight: every matrix) and its gradient
    through time, saved as time.parquet and read back by ``gradlab.load``."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(B, 5, 4), torch.randint(0, 3, (B,))
    twin = copy.deepcopy(model)
    (out,), calls = calls_of(twin, ["rnn"], lambda: (twin(x),))
    loss = F.cross_entropy(out, y)
    y_seq = calls["rnn"][0][0]
    grads = torch.autograd.grad(loss, [y_seq, *twin.rnn.parameters()])
    weights = [g for (n, _), g in zip(twin.rnn.named_parameters(), grads[1:]) if "weight" in n]
    with gradlab.watch(model, opt, log_every=1, modules=(nn.LSTM, nn.Linear)) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    path = rec.save(tmp_path, name="lstm")
    row = pq_frame(path)
    lstm = row[row["layer_name"] == "rnn"].iloc[0]
    assert lstm["grad_weight_norm"] == pytest.approx(
        np.sqrt(sum(g.double().norm().item() ** 2 for g in weights)), rel=1e-5)
    assert lstm["grad_output_norm"] == pytest.approx(grads[0].double().norm().item(), rel=1e-5)
    time = gradlab.load(tmp_path).time
    assert time["t"].tolist() == list(range(5))
    per_t = grads[0].double().norm(dim=(0, 2))
    assert time["grad_output_norm"].tolist() == pytest.approx(per_t.tolist(), rel=1e-5)


def pq_frame(path):
    import pyarrow.parquet as pq

    return pq.read_table(path / "grads.parquet").to_pandas()


class Checkpointed(nn.Module):
    """A block under gradient checkpointing between two plain layers."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.block = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12))
        self.out = nn.Linear(12, 3)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.inp(x))
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(h)


@pytest.mark.parametrize("case", ["checkpoint reentrant", "checkpoint", "zero to zeros",
                                  "compiled"])
def test_loops_that_were_right_stay_right(case):
    """Gradient checkpointing (both modes), zero_grad(set_to_none=False) with accumulated
    micro-batches, and torch.compile: every step against autograd on a copy."""
    torch.manual_seed(0)
    model = (Checkpointed(case == "checkpoint reentrant") if case.startswith("checkpoint")
             else nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = torch.compile(model, backend="eager") if case == "compiled" else model
    xs, ys = torch.randn(3, 2, B, 6), torch.randint(0, 3, (3, 2, B))
    micro = 2 if case == "zero to zeros" else 1
    expected = []
    with gradlab.watch(model, opt, log_every=1) as rec:
        for x, y in zip(xs, ys):
            twin = copy.deepcopy(model)
            twin.reentrant = False  # (a reentrant checkpoint's z take no part in autograd.grad)
            expected.append(reference(twin, lambda: sum(
                F.cross_entropy(twin(x[i]), y[i]) for i in range(micro))))
            opt.zero_grad(set_to_none=case != "zero to zeros")
            for i in range(micro):
                F.cross_entropy(run(x[i]), y[i]).backward()
            opt.step()
    frame = rec.flush()
    assert sorted(frame["step"].unique()) == [0, 1, 2]
    for step in range(3):
        check(frame, step, expected[step])


def test_bad_models_and_a_second_enter_are_one_line_errors():
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        gradlab.watch(object())
    with torch.device("meta"):
        meta = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="meta device"):
        gradlab.watch(meta)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gradlab.watch(model, opt, log_every=1)
    with rec:
        with pytest.raises(RuntimeError, match="already entered") as info:
            with rec:
                pass
        assert "\n" not in str(info.value)
        opt.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks
    assert rec.flush()["step"].tolist() == [0]


def test_fp16_autocast_with_a_grad_scaler_against_autograd():
    """fp16 autocast on the CPU and GradScaler (given to watch): the records are those of the
    real loss, computed in the same precision by the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))

    def loss_of(net):
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(net(x).float(), y)

    expected = []
    with gradlab.watch(model, opt, log_every=1, scaler=scaler) as rec:
        for _ in range(2):
            twin = copy.deepcopy(model)
            expected.append(reference(twin, lambda: loss_of(twin)))
            opt.zero_grad()
            scaler.scale(loss_of(model)).backward()
            scaler.step(opt)
            scaler.update()
    frame = rec.flush()
    for step in range(2):
        check(frame, step, expected[step], rel=2e-3)


def test_dropout_adadelta_and_a_group_added_later_stay_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3))
    opt = torch.optim.Adadelta(model[0].parameters(), lr=1.0)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    expected, ratios = [], []
    with gradlab.watch(model, opt, log_every=1) as rec:
        for step in range(3):
            if step == 1:
                opt.add_param_group({"params": model[3].parameters()})
            twin = copy.deepcopy(model)
            torch.manual_seed(10 + step)  # the same dropout mask in both
            expected.append(reference(twin, lambda: F.cross_entropy(twin(x), y), {"0": "tanh"}))
            before = model[3].weight.detach().clone()
            torch.manual_seed(10 + step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ratio = ((model[3].weight.detach() - before).norm() / before.norm()).item()
            ratios.append(ratio)
    frame = rec.flush()
    for step in range(3):
        check(frame, step, expected[step])
    head = frame[frame["layer_name"] == "3"].sort_values("step")["update_ratio"]
    assert np.isnan(head.iloc[0])  # not stepped by the optimizer at step 0: empty, not 0
    assert head.iloc[1:].tolist() == pytest.approx(ratios[1:], rel=1e-4)
