"""On a CUDA device: both engines and the ensemble train there as on the CPU, and recording a step
never synchronises the host with the device. Marked ``cuda``; ``benchmarks/gpu_check.sh`` runs
them on a GPU machine, and elsewhere they are skipped with the reason."""

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gradlab.config import make_config
from gradlab.data import Data, Split
from gradlab.models import build_mlp
from gradlab.record import GradientRecorder
from gradlab.train import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)"),
]

NORMS = ("grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm",
         "update_ratio", "act_grad_mean", "loss")


def on(data: Data, device: str) -> Data:
    return Data(train=Split(data.train.x.to(device), data.train.y.to(device)),
                test=Split(data.test.x.to(device), data.test.y.to(device)))


@contextlib.contextmanager
def no_host_sync():
    """Any operation that makes the host wait for the device raises inside."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """fp32 products as on the CPU (no TF32), for the records to agree to float rounding."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def assert_records_agree(gpu, cpu, rtol=2e-4):
    assert gpu.status == cpu.status == "complete"
    assert gpu.grads[["step", "epoch", "layer"]].equals(cpu.grads[["step", "epoch", "layer"]])
    for column in NORMS:
        np.testing.assert_allclose(gpu.grads[column], cpu.grads[column], rtol=rtol, atol=1e-7,
                                   err_msg=column)
    np.testing.assert_allclose(gpu.epochs["loss"], cpu.epochs["loss"], rtol=1e-4)
    np.testing.assert_allclose(gpu.epochs["accuracy"], cpu.epochs["accuracy"], atol=0.02)


@pytest.mark.parametrize("engine", ["autograd", "fused"])
@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9, clip_grad_norm=0.5)])
def test_engines_train_on_cuda_as_on_the_cpu(tiny_data, engine, options):
    config = make_config(depth=4, widths=(32, 24, 16), epochs=2, batch_size=32, lr=0.1,
                         engine=engine, **options)
    cpu = train(config, data=tiny_data, device="cpu")
    gpu = train(config, data=on(tiny_data, "cuda"), device="cuda")
    assert_records_agree(gpu, cpu)


def test_ensemble_on_cuda_matches_the_solo_cpu_runs(tiny_data):
    from gradlab.engines.ensemble import train_ensemble

    config = make_config(depth=3, widths=(24, 16), epochs=2, batch_size=32, lr=0.1,
                         engine="fused")
    configs = [dataclasses.replace(config, seed=seed) for seed in (0, 1, 2)]
    results = train_ensemble(configs, data=on(tiny_data, "cuda"), device="cuda")
    assert [r.extra["ensemble_size"] for r in results] == [3, 3, 3]  # one group on a GPU
    for c, result in zip(configs, results, strict=True):
        assert_records_agree(result, train(c, data=tiny_data, device="cpu"))


def test_hook_recorder_does_not_synchronise_per_step():
    torch.manual_seed(0)
    model = build_mlp((784, 64, 32, 10), "sigmoid").cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(20, 32, 784, device="cuda", generator=g)
    y = torch.randint(0, 10, (20, 32), device="cuda", generator=g)
    def step(index):
        rec.begin_step(index)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        rec.after_backward(loss)
        optimizer.step()
        rec.after_update()

    with GradientRecorder(model, "sigmoid", np.arange(20), optimizer=optimizer) as rec:
        for index in range(2):  # the first steps allocate the buffers (host-to-device copies)
            step(index)
        with no_host_sync():
            for index in range(2, 20):
                step(index)
        frame = rec.flush(epoch=1)
    assert len(frame) == 20 * 3 and np.isfinite(frame["grad_weight_norm"]).all()


@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9), dict(clip_grad_norm=0.5),
                                     dict(optimizer="adam", lr=0.01)])
def test_stacked_engine_does_not_synchronise_per_step(options):
    from gradlab.engines.stacked import StackedMLP

    torch.manual_seed(0)
    models = [build_mlp((784, 64, 32, 10), "sigmoid").cuda() for _ in range(2)]
    engine = StackedMLP(models, "sigmoid", batch_size=32, max_rows=20, **{"lr": 0.1, **options})
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(20, 2, 32, 784, device="cuda", generator=g)
    y = torch.randint(0, 10, (20, 2, 32), device="cuda", generator=g)
    for step in range(2):  # the first steps make the per-batch views (host-to-device copies)
        engine.step(x[step], y[step], record=step % 2 == 0)
    with no_host_sync():
        for step in range(2, 20):
            engine.step(x[step], y[step], record=step % 2 == 0)
    frames = engine.flush(list(range(0, 20, 2)), epoch=1)
    assert all(len(f) == 10 * 3 and np.isfinite(f["grad_weight_norm"]).all() for f in frames)
