"""Each PyTorch internal of ``gradlab.compat`` against its public equivalent, and its fallback."""

import pytest
import torch

from gradlab import compat
from gradlab.engines import act_kernels
from gradlab.engines.act_kernels import ACTIVATIONS


def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 7, generator=g), torch.randn(3, generator=g) * 1e3]


@pytest.mark.parametrize("private", [True, False])
def test_foreach_ops_equal_their_public_forms(monkeypatch, private):
    if not private:  # a torch without the fused ops: the public fallbacks
        for name in ("_foreach_norm", "_foreach_copy_", "_foreach_sub"):
            monkeypatch.delattr(torch, name, raising=False)
    a, b = tensors(), [t * 2 for t in tensors()]
    for got, t in zip(compat.foreach_norm(a), a, strict=True):
        torch.testing.assert_close(got, torch.linalg.vector_norm(t))
    for got, x, y in zip(compat.foreach_sub(a, b), a, b, strict=True):
        torch.testing.assert_close(got, x - y)
    targets = [torch.empty_like(t) for t in a]
    compat.foreach_copy_(targets, a)
    assert all(torch.equal(t, s) for t, s in zip(targets, a, strict=True))


def test_version_counts_in_place_changes():
    t = torch.zeros(3)
    before = compat.version(t)
    t.add_(1)
    assert compat.version(t) != before
    assert compat.version(t) == compat.version(t)


def test_without_a_version_counter_every_comparison_says_changed():
    class Bare:  # a tensor type of a torch that does not expose ``_version``
        pass

    assert compat.version(Bare()) != compat.version(Bare())
    bare = Bare()
    assert compat.version(bare) != compat.version(bare)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kernel", [True, False])
def test_activation_backward_equals_autograd(monkeypatch, name, kernel):
    """The registry's backward (aten's kernel, or its public fallback) is autograd's dL/dz."""
    if not kernel:
        monkeypatch.setattr(act_kernels, "_aten", None)
    act = ACTIVATIONS[name]
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True) * 3
    z.retain_grad()
    a = act.module()(z)
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    (want,) = torch.autograd.grad(a, z, g)
    saved = a.detach() if act.saves == "output" else z.detach()
    got = act.backward(g, saved, torch.empty_like(g))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if act.forward_into is not None:
        torch.testing.assert_close(act.forward_into(z.detach(), torch.empty_like(g)), a.detach())
