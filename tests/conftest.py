"""Shared fixtures: tiny synthetic data made once from a seeded generator, and a fake MNIST
folder in torchvision's layout for CLI tests that must not need the real files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlab.data import Data, Split

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
