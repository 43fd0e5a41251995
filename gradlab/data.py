"""MNIST and Fashion-MNIST through torchvision, held as one float tensor on the training device."""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import GradlabError

if TYPE_CHECKING:
    import torch

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Where Debian's `dataset-fashion-mnist` package puts its four .gz files.
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


class DataError(GradlabError, RuntimeError):
    """The data could not be found or read; the message is one line saying where and what."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, 784) float32, on the device
    y: torch.Tensor  # (N,) int64, on the device

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass(frozen=True)
class Data:
    train: Split
    test: Split


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``--data-dir``, else ``$GRADLAB_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("GRADLAB_DATA") or "data")


def _dataset_class(name: str):
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]


# torchvision's folder for each dataset (its class name), known without importing torchvision:
# checking the files before a sweep imports neither torch nor torchvision.
FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# The training examples of each dataset, known before its files are read (a sweep's progress
# counts its steps before any run loads its data).
TRAIN_SIZES = {"mnist": 60_000, "fashion-mnist": 60_000}


def _raw_folder(name: str, root: Path) -> Path:
    return root / FOLDERS[name] / "raw"


def _has_raw(folder: Path) -> bool:
    return all((folder / f).is_file() for f in RAW_FILES)


def _copy_debian_fashion(folder: Path) -> bool:
    """Decompress Debian's Fashion-MNIST .gz files into torchvision's layout, if installed."""
    sources = [DEBIAN_FASHION / f"{f}.gz" for f in RAW_FILES]
    if not all(s.is_file() for s in sources):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for src, name in zip(sources, RAW_FILES, strict=False):
        tmp = folder / f"{name}.tmp"
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(folder / name)
    return True


def _missing_message(name: str, root: Path, reason: str) -> str:
    folder = _raw_folder(name, root)
    hint = " (or `apt-get install dataset-fashion-mnist`)" if name == "fashion-mnist" else ""
    return (f"{name} not found in {folder} and {reason}: put {', '.join(RAW_FILES)} there, "
            f"or point --data-dir / $GRADLAB_DATA at a folder holding "
            f"{FOLDERS[name]}/raw/{hint}")


def ensure_raw(name: str, root: Path, *, download: bool = True) -> Path:
    """Make sure the four raw files exist under ``root``; download (or copy from Debian) if not."""
    folder = _raw_folder(name, root)
    if _has_raw(folder):
        return folder
    if name == "fashion-mnist" and _copy_debian_fashion(folder):
        return folder
    if not download:
        raise DataError(_missing_message(name, root, "downloading is off"))
    created = [p for p in (root, folder.parent) if not p.exists()]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        _dataset_class(name)(root=str(root), train=True, download=True)
    except Exception as e:  # any network or write failure ends in one clear line
        for path in reversed(created):  # leave nothing partial behind
            shutil.rmtree(path, ignore_errors=True)
        reason = f"the download failed ({type(e).__name__})"
        raise DataError(_missing_message(name, root, reason)) from None
    finally:
        socket.setdefaulttimeout(old)
    if not _has_raw(folder):
        raise DataError(_missing_message(name, root, "the download did not produce them"))
    return folder


def _idx_shape(path: Path, ndim: int) -> tuple[int, ...]:
    """The shape in an uint8 IDX file's header, checked against the file's size (a truncated
    file, or one that is not IDX, raises ValueError)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or header[:4] != bytes((0, 0, 0x08, ndim)):
        raise ValueError(f"{path.name} has no uint8 IDX header with {ndim} dimension(s)")
    shape = struct.unpack(f">{ndim}I", header[4:])
    expected = len(header) + math.prod(shape)
    if size != expected:
        raise ValueError(f"{path.name} has {size} bytes, its header says {expected}")
    return shape


def check_raw(name: str, folder: Path) -> int:
    """Check the four raw files without loading the images: IDX headers that match the file
    sizes, 28x28 images, as many labels 0-9. Returns the number of training examples."""
    counts = {}
    for prefix in ("train", "t10k"):
        try:
            images = _idx_shape(folder / f"{prefix}-images-idx3-ubyte", 3)
            labels = _idx_shape(folder / f"{prefix}-labels-idx1-ubyte", 1)
        except (OSError, ValueError) as e:
            raise DataError(f"could not read {name} files in {folder}: they are truncated or "
                            f"not IDX files ({e}); expected {', '.join(RAW_FILES)}") from None
        values = (folder / f"{prefix}-labels-idx1-ubyte").read_bytes()[8:]
        if images[1:] != (28, 28) or labels[0] != images[0] or not images[0] or max(values) > 9:
            raise DataError(f"{folder} does not hold {name}: expected 28x28 uint8 images with "
                            f"as many labels 0-9, got {prefix} images {images} and "
                            f"{labels[0]} labels up to {max(values, default=0)}")
        counts[prefix] = images[0]
    return counts["train"]


def check_train_size(name: str, train_size: int | None, available: int) -> None:
    if train_size is not None and train_size > available:
        raise DataError(f"train_size={train_size} is larger than the {available} training "
                        f"examples of {name}: give at most {available}, or leave it out")


def ensure_data(name: str, root: Path, train_size: int | None = None) -> Path:
    """Everything a run needs of its data, checked before anything is written: the raw files
    (downloaded if missing), whole and of the right shape, and ``train_size`` examples."""
    folder = ensure_raw(name, root)
    check_train_size(name, train_size, check_raw(name, folder))
    return folder


@functools.lru_cache(maxsize=4)
def _load_uint8(name: str, root: str) -> tuple[torch.Tensor, ...]:
    """Read the raw files once per process (torchvision parses the IDX format)."""
    import torch

    folder = ensure_raw(name, Path(root))
    cls = _dataset_class(name)
    out = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=False)
        except Exception as e:
            raise DataError(f"could not read {name} files in {folder}: they are truncated or not "
                            f"IDX files ({type(e).__name__}); expected {', '.join(RAW_FILES)}"
                            ) from None
        x, y = ds.data, ds.targets
        if (x.dtype != torch.uint8 or x.ndim != 3 or tuple(x.shape[1:]) != (28, 28)
                or len(x) != len(y) or len(x) == 0 or int(y.min()) < 0 or int(y.max()) > 9):
            raise DataError(f"{folder} does not hold {name}: expected 28x28 uint8 images with "
                            f"as many labels 0-9, got images {tuple(x.shape)} ({x.dtype}) and "
                            f"{len(y)} labels")
        out += [x, y]
    return tuple(out)


def load_data(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    train_size: int | None = None,
    standardize: bool = False,
) -> Data:
    """Load a dataset as float tensors in [0, 1] (as ``ToTensor`` scales), flattened to 784.

    Args:
        name: ``mnist`` or ``fashion-mnist``.
        data_dir: root in torchvision's layout; see ``resolve_data_dir``.
        device: where the tensors live for the whole run.
        train_size: use only the first N training examples.
        standardize: subtract the training mean and divide by its std (one scalar each).
    """
    root = resolve_data_dir(data_dir)
    x_tr, y_tr, x_te, y_te = _load_uint8(name, str(root))
    if train_size is not None:
        check_train_size(name, train_size, len(x_tr))
        x_tr, y_tr = x_tr[:train_size], y_tr[:train_size]
    x_tr = x_tr.reshape(len(x_tr), -1).float().div_(255)
    x_te = x_te.reshape(len(x_te), -1).float().div_(255)
    if standardize:
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return Data(
        train=Split(x_tr.to(device), y_tr.to(device)),
        test=Split(x_te.to(device), y_te.to(device)),
    )


def batch_order(n: int, batch_size: int, generator: torch.Generator, device=None):
    """One epoch's shuffled index batches from a seeded CPU generator (always shuffled), moved
    to ``device`` in one copy so the step loop does no host-to-device transfer."""
    import torch

    perm = torch.randperm(n, generator=generator)
    return perm.to(device).split(batch_size)
