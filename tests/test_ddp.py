"""``gradlab.watch`` under DistributedDataParallel (2 gloo processes on the CPU): every rank
records the synchronised gradient that the optimizer applies, and rank 0 saves one run."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

WORLD, B = 2, 6

pytestmark = pytest.mark.slow  # (two processes: ~10 s)


def batches(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return [(torch.randn(B, 5, generator=g), torch.randint(0, 3, (B,), generator=g))
            for _ in range(3)]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def worker(rank, out, port):
    import gradlab

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    ddp = nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with gradlab.watch(ddp, opt, log_every=1) as rec:
        for x, y in batches(rank):
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
    frame = rec.flush()
    frame.to_pickle(os.path.join(out, f"rank{rank}.pkl"))
    rec.save(out, name="ddp")
    dist.destroy_process_group()


def test_every_rank_records_the_synchronised_gradient(tmp_path):
    import pandas as pd

    port = 29500 + os.getpid() % 1000
    mp.spawn(worker, args=(str(tmp_path), port), nprocs=WORLD, join=True)
    # the reference: one process, the mean of the ranks' losses (what DDP's averaging makes)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    expected = []
    for pairs in zip(*(batches(r) for r in range(WORLD))):
        opt.zero_grad()
        loss = sum(F.cross_entropy(net(x), y) for x, y in pairs) / WORLD
        loss.backward()
        expected.append([m.weight.grad.double().norm().item() for m in (net[0], net[2])])
        opt.step()
    for rank in range(WORLD):
        frame = pd.read_pickle(tmp_path / f"rank{rank}.pkl")
        for step in range(3):
            got = frame[frame["step"] == step].sort_values("layer")["grad_weight_norm"]
            assert got.tolist() == pytest.approx(expected[step], rel=1e-5), (rank, step)
    config = json.loads((tmp_path / "runs" / "ddp" / "config.json").read_text())
    assert config["watched"]["world_size"] == WORLD
    assert (tmp_path / "runs" / "ddp" / "status.json").exists()
