"""The optional one-pass kernel for relu-family f' counts (``engines/positives.py``) against
counting ``z > 0`` with PyTorch, and the recorder with and without it."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab import record

pytest.importorskip("numba")
from gradlab.engines.positives import count_positive_into  # noqa: E402

SHAPES = [((64, 8, 26, 26), -3), ((8, 26, 26), -3), ((64, 64), -1), ((4, 5, 7, 64), -1),
          ((3, 6, 11), -2), ((6, 11), -2), ((1, 1), -1)]


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_counts_match_pytorch_including_zeros_nan_and_infinities(shape, axis):
    torch.manual_seed(0)
    z = torch.randn(shape)
    z.view(-1)[:5] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")])[
        : z.numel()]
    unit_first = z.movedim(axis, 0).reshape(shape[axis], -1)
    expected = (unit_first > 0).sum(1).float()
    out = torch.full((shape[axis],), 123.0)
    assert count_positive_into(z, axis, out, add=False)
    assert torch.equal(out, expected)
    assert count_positive_into(z, axis, out, add=True)
    assert torch.equal(out, 2 * expected)
    torch_path = record.per_unit_sum((z > 0).float(), axis)
    assert torch.equal(torch_path, expected)


@pytest.mark.parametrize("z", [torch.randn(4, 3, dtype=torch.float64),
                               torch.randn(4, 3, dtype=torch.bfloat16),
                               torch.randn(3, 4).t()])
def test_the_kernel_declines_what_it_does_not_handle(z):
    out = torch.full((3,), 7.0)
    assert not count_positive_into(z, -1, out, add=False)
    assert torch.equal(out, torch.full((3,), 7.0))


@pytest.mark.parametrize("kernel", [True, False])
def test_a_convolution_on_unbatched_input_counts_per_channel(kernel, monkeypatch):
    """A Conv2d given one (C, H, W) image: units are its channels, axis 0 of z."""
    if not kernel:
        monkeypatch.setattr(record, "USE_KERNELS", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(3 * 6 * 6, 5))
    seen = []
    model[0].register_forward_hook(lambda m, i, z: seen.append(z.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradlab.watch(model, opt, log_every=1, modules=(nn.Conv2d, nn.Linear)) as rec:
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(1, 8, 8))[None], torch.tensor([2])).backward()
        opt.step()
    (z,) = seen
    row = rec.flush().set_index("layer_name").loc["0"]
    assert row["act_grad_mean"] == (z > 0).sum().item() / z.numel()
    assert row["dead_frac"] == ((z > 0).flatten(1).sum(1) == 0).float().mean().item()


def test_records_are_the_same_bits_with_and_without_the_kernels(monkeypatch):
    """A CNN's f' columns through ``watch``, with a NaN input in one step: the kernels only
    count, as PyTorch's ops do, so the records do not depend on whether numba is installed."""
    frames = []
    for use in (True, False):
        monkeypatch.setattr(record, "USE_KERNELS", use)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3),
                              nn.LeakyReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 6),
                              nn.ReLU(), nn.Linear(6, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        with gradlab.watch(model, opt, log_every=1, modules=(nn.Conv2d, nn.Linear)) as rec:
            for step in range(3):
                x = torch.randn(7, 1, 8, 8, generator=g)
                if step == 1:
                    x[0, 0, 0, :4] = float("nan")
                opt.zero_grad()
                F.cross_entropy(model(x), torch.randint(0, 3, (7,), generator=g)).backward()
                opt.step()
        frames.append(rec.flush()[["act_grad_mean", "saturated_frac", "dead_frac"]])
    assert frames[0].notna().to_numpy().any()
    assert frames[0].to_numpy().tobytes() == frames[1].to_numpy().tobytes()
