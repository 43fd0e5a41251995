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
    torch_path = record._per_unit_sum((z > 0).float(), axis)
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


def test_counts_below_a_threshold_match_pytorch_with_nan_and_ties():
    """Saturated counts (f' below the threshold) per step and unit: the same as PyTorch's
    floor trick in ``record.activation_stats``, NaN where a value is NaN, ties not below."""
    from gradlab.engines.positives import count_below

    torch.manual_seed(0)
    fp = torch.rand(5, 33, 40) * 0.25
    fp[0, 3, 5] = float("nan")
    fp[1, :, 7] = 0.025
    threshold = 0.025
    expected = fp.clone().sub_(threshold).floor_().sum(-2).neg_()
    got = count_below(fp, threshold)
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().sum() == 1
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected))
    assert got[1, 7] == 0
    assert count_below(fp.double(), threshold) is None
    assert count_below(fp[0], threshold) is None
