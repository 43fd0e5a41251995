"""Shared fixtures: tiny synthetic data made once from a seeded generator, a fake MNIST folder
in torchvision's layout for CLI tests that must not need the real files, and results folders
trained on it once a session for the tests that only read results (ls, plot, report, load).

``python3 -m pytest -q`` runs the fast tier; the tests marked ``slow`` (real MNIST, real
processes and signals, fault injection, experiment builds, sweeps that train for many seconds)
run with ``python3 -m pytest -q -m slow``."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlab.config import make_config
from gradlab.data import Data, Split
from gradlab.runner import execute

from .helpers import sweep

REAL_DATA = os.environ.get("GRADLAB_DATA", "data")


def has_real_mnist() -> bool:
    return (Path(REAL_DATA) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def make_tiny_data(n_train: int = 256, n_test: int = 128, seed: int = 0) -> Data:
    """Separable-ish synthetic 784-d data: each class has its own random mean."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(10, 784, generator=g)

    def split(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = (means[y] + 0.3 * torch.randn(n, 784, generator=g)).clamp(0, 1)
        return Split(x, y)

    return Data(train=split(n_train), test=split(n_test))


@pytest.fixture(scope="session")
def tiny_data() -> Data:
    return make_tiny_data()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in the IDX format (test fixture only; gradlab reads via torchvision)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = (rng.random((n, 28, 28)) * 60 + labels[:, None, None] * 19).clip(0, 255)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("fake_data"))


def make_results(out: Path, data_dir: Path) -> Path:
    """Tiny real runs on fake MNIST: 2 depths × 2 activations × 2 seeds, and one that
    diverges (a huge learning rate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        for depth in (2, 3):
            for activation in ("sigmoid", "relu"):
                for seed in (0, 1):
                    execute(make_config(depth=depth, width=8, activation=activation, seed=seed,
                                        epochs=2), out, data_dir=str(data_dir), device="cpu")
        status = execute(make_config(depth=3, width=8, activation="relu", lr=1e30, epochs=2),
                         out, data_dir=str(data_dir), device="cpu")
        assert status["status"] == "diverged"
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def trained(fake_mnist, tmp_path_factory) -> Path:
    """``make_results``'s folder, trained once a session. Its runs are never changed: ``plot``
    and ``report`` write their outputs beside them; a test that damages a run copies it first."""
    return make_results(tmp_path_factory.mktemp("trained") / "res", fake_mnist)


@pytest.fixture(scope="session")
def one_run(fake_mnist, tmp_path_factory) -> Path:
    """A results folder with one complete run (depth 2, width 8, 1 epoch of 64 examples);
    tests copy it before writing into it."""
    out = tmp_path_factory.mktemp("one_run") / "res"
    r = sweep(fake_mnist, out, "--preset", "train", "--depths", "2", "--width", "8",
              "--epochs", "1", "--train-sizes", "64")
    assert r.exit_code == 0, r.output
    return out
