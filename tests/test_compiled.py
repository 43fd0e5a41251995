"""``gradlab.watch`` on a ``torch.compile``d model: no graph break, no compile after the first
recorded and the first unrecorded step, and every column equal to an independent autograd
computation on an eager copy (``test_watch.reference``).

The fast tier traces with dynamo and AOTAutograd (``backend="aot_eager"``: the same graphs,
breaks and guards, without inductor's code generation); the slow tier compiles with inductor,
as ``torch.compile(model)`` does, on an MLP and a Transformer encoder block."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

import gradlab

from .test_watch import BATCH, IN, OUT, Encoder, Shared, check_frame, reference

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch without compile")


def relu_mlp():
    """A plain MLP, its relus in place (the compiled hook must keep z before they run)."""
    return nn.Sequential(nn.Linear(IN, 16), nn.ReLU(inplace=True), nn.Linear(16, 8),
                         nn.ReLU(inplace=True), nn.Linear(8, OUT))


MODELS = {  # make, input shape, activations given to watch, the truth for the reference
    "mlp": (relu_mlp, (IN,), None, {"0": "relu", "2": "relu"}),
    "shared": (Shared, (IN,), {"inp": "sigmoid", "shared": "sigmoid"},
               {"inp": "sigmoid", "shared": "sigmoid"}),
    "encoder": (Encoder, (4, IN), {"enc.linear1": "relu"}, {"enc.linear1": "relu"}),
}


def compiled_run(kind: str, backend: str, log_every: int, steps: int = 5):
    """Train a compiled model under watch; returns (per recorded step: the reference and the
    frame), the graph breaks, and the compiled graphs after each step."""
    make, shape, given, truth = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)  # eager, without the recorder's hooks
    for module in twin.modules():  # (the reference's z must outlive the activation)
        if getattr(module, "inplace", False):
            module.inplace = False
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, *shape, generator=g),
                torch.randint(0, OUT, (BATCH,), generator=g)) for _ in range(steps)]
    torch._dynamo.reset()
    counters.clear()
    graphs, checks = [], []
    with gradlab.watch(compiled, opt, log_every=log_every, activations=given) as rec:
        for step, (x, y) in enumerate(batches):
            twin.load_state_dict(model.state_dict())
            expected = reference(twin, names, None, truth, x, y)
            before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                      if n in names}
            opt.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            opt.step()
            graphs.append(counters["stats"]["unique_graphs"])
            if step % log_every == 0:
                ratios = {n: {"update_ratio": ((m.weight.detach().double() - before[n].double())
                                               .norm() / before[n].norm()).item()}
                          for n, m in model.named_modules() if n in names}
                checks.append((expected, ratios, rec.flush()))
    return checks, dict(counters["graph_break"]), graphs


def check(kind: str, backend: str, log_every: int) -> None:
    checks, breaks, graphs = compiled_run(kind, backend, log_every)
    assert breaks == {}
    # one graph for recorded steps, one for the others (none when every step is recorded)
    settled = 1 if log_every == 1 else 2
    assert graphs[settled - 1] == graphs[-1] == settled, graphs
    assert len(checks) == len(range(0, 5, log_every))
    for expected, ratios, frame in checks:
        check_frame(frame, expected, ratios)


@pytest.mark.parametrize("kind", MODELS)
def test_compiled_model_records_like_autograd_without_graph_breaks(kind):
    check(kind, "aot_eager", 2)


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 2])
@pytest.mark.parametrize("kind", ["mlp", "encoder"])
def test_inductor_compiled_model_records_like_autograd_without_graph_breaks(kind, log_every):
    check(kind, "inductor", log_every)


def test_graphs_compiled_before_watch_or_by_an_earlier_watch_are_not_reused():
    """Dynamo does not guard on module hooks: a graph traced without the recorder's hooks (a
    warm-up, an earlier watch) would run on without them, recording no dL/dz and no f'."""
    torch.manual_seed(0)
    model = relu_mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))

    def step():
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()

    step()  # a warm-up, compiled without hooks
    for _ in range(2):  # two watches in turn
        with gradlab.watch(compiled, opt, log_every=2) as rec:
            for _ in range(3):
                step()
        frame = rec.flush()
        assert list(frame["step"]) == [0, 0, 0, 2, 2, 2]
        assert frame["grad_output_norm"].notna().all()
        assert frame.loc[frame["layer_name"] != "4", "dead_frac"].notna().all()
