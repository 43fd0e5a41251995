import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlab import data as gdata
from gradlab.data import DEBIAN_FASHION, RAW_FILES, DataError, batch_order, load_data

from .conftest import write_fake_mnist, write_idx


def fresh_fake(tmp_path, **kw) -> Path:
    gdata._load_uint8.cache_clear()
    return write_fake_mnist(tmp_path / "d", **kw)


def test_loads_scaled_flat_tensors(tmp_path):
    root = fresh_fake(tmp_path, n_train=100, n_test=20)
    d = load_data("mnist", root)
    assert d.train.x.shape == (100, 784) and d.train.x.dtype == torch.float32
    assert 0 <= d.train.x.min() and d.train.x.max() <= 1
    assert len(d.test) == 20 and d.train.y.dtype == torch.int64
    assert len(load_data("mnist", root, train_size=30).train) == 30
    s = load_data("mnist", root, standardize=True).train.x
    assert abs(s.mean().item()) < 1e-4 and abs(s.std().item() - 1) < 1e-3
    with pytest.raises(DataError, match="train_size=101"):
        load_data("mnist", root, train_size=101)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADLAB_DATA", str(tmp_path))
    assert gdata.resolve_data_dir() == tmp_path
    assert gdata.resolve_data_dir("x") == Path("x")
    monkeypatch.delenv("GRADLAB_DATA")
    assert gdata.resolve_data_dir() == Path("data")


def test_truncated_idx_file_is_one_clear_error(tmp_path):
    root = fresh_fake(tmp_path)
    f = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(DataError) as info:
        load_data("mnist", root)
    assert "truncated or not IDX" in str(info.value) and "\n" not in str(info.value)


def test_non_mnist_files_rejected(tmp_path):
    root = fresh_fake(tmp_path)
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((512, 32, 32)))
    with pytest.raises(DataError, match="does not hold mnist"):
        load_data("mnist", root)


def test_missing_files_named_and_nothing_left_behind(tmp_path):
    gdata._load_uint8.cache_clear()
    root = tmp_path / "nothing"
    with pytest.raises(DataError) as info:
        gdata.ensure_raw("mnist", root, download=False)
    message = str(info.value)
    assert str(root / "MNIST" / "raw") in message
    assert all(f in message for f in RAW_FILES)
    assert not root.exists()


def test_batch_order_seeded_and_complete():
    a = batch_order(10, 4, torch.Generator().manual_seed(1))
    b = batch_order(10, 4, torch.Generator().manual_seed(1))
    assert [len(x) for x in a] == [4, 4, 2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    c = batch_order(10, 4, torch.Generator().manual_seed(2))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian(tmp_path):
    gdata._load_uint8.cache_clear()
    d = load_data("fashion-mnist", tmp_path, train_size=1000)
    assert len(d.train) == 1000 and len(d.test) == 10000
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    shutil.rmtree(tmp_path / "FashionMNIST")


def test_gather_batches_gives_each_steps_rows_threaded_or_not():
    import torch

    from gradlab.engines.batches import PREFETCH_STEPS, gather_batches

    x = torch.arange(300 * 3, dtype=torch.float32).view(300, 3)
    y = torch.arange(300)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    indices = list(perm.split(7)) + [torch.stack([perm[:5], perm[5:10]])]
    assert len(indices) > 2 * PREFETCH_STEPS
    for threaded in (True, False):
        got = list(gather_batches(x, y, indices, threaded=threaded))
        assert len(got) == len(indices)
        for (bx, by), index in zip(got, indices, strict=True):
            assert torch.equal(bx, x[index]) and torch.equal(by, y[index])


def test_gather_batches_prepares_each_group_in_alternating_slots():
    import torch

    from gradlab.engines.batches import PREFETCH_STEPS, gather_batches

    x = torch.arange(200 * 3, dtype=torch.float32).view(200, 3)
    y = torch.arange(200)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    indices = [perm[i:i + 10].view(2, 5) for i in range(0, 200, 10)] * 3
    indices.append(perm[:6].view(2, 3))  # a short last step
    assert len(indices) > 2 * PREFETCH_STEPS
    for threaded in (True, False):
        slots = []

        def prepare(rows, slot, shapes, slots=slots):
            slots.append(slot)
            ends = np.cumsum([0] + [np.prod(shape) for shape in shapes])
            return [rows[a:b].clone() for a, b in zip(ends, ends[1:])], shapes

        got = list(gather_batches(x, y, indices, threaded=threaded, prepare=prepare))
        groups = 5 if threaded else 4  # threaded, the first has FIRST_STEPS: 2, 16, 16, 16, 11
        assert slots == [k % 2 for k in range(groups)]
        for (bx, by, ((steps, shapes), j)), index in zip(got, indices, strict=True):
            assert torch.equal(bx, x[index]) and torch.equal(by, y[index])
            assert shapes[j] == tuple(index.shape)
            assert torch.equal(steps[j], x[index.reshape(-1)])


def _gather_in_child(queue):
    import torch

    from gradlab.engines.batches import gather_batches

    x = torch.arange(40.0).view(20, 2)
    got = list(gather_batches(x, torch.arange(20), [torch.arange(i, i + 2) for i in range(10)],
                              threaded=True))
    queue.put(len(got))


def test_gather_batches_one_worker_thread_reused_after_an_early_stop_and_in_a_fork():
    import multiprocessing
    import threading

    import torch

    from gradlab.engines.batches import gather_batches

    x = torch.arange(300.0).view(100, 3)
    indices = [torch.arange(i, i + 2) for i in range(0, 100, 2)]
    for _ in range(2):
        for k, _ in enumerate(gather_batches(x, torch.arange(100), indices, threaded=True)):
            if k == 20:
                break  # the generator is closed with a group pending
        got = list(gather_batches(x, torch.arange(100), indices, threaded=True))
        assert len(got) == 50 and torch.equal(got[-1][0], x[98:])
    workers = [t for t in threading.enumerate() if t.name.startswith("gradlab-gather")]
    assert len(workers) == 1
    # a forked child inherits the executor but not its thread: it must make its own
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_gather_in_child, args=(queue,))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and queue.get(timeout=5) == 10


@pytest.mark.parametrize("threaded", [True, False])
def test_gather_batches_into_reused_buffers(threaded):
    from gradlab.engines.batches import gather_batches

    x = torch.randn(500, 7)
    y = torch.arange(500)
    g = torch.Generator().manual_seed(2)
    buffers = [None, None]
    kept = []
    for _ in range(2):
        indices = list(torch.randperm(500, generator=g).split(12))  # a short last batch
        for (bx, by), index in zip(gather_batches(x, y, indices, threaded, buffers=buffers),
                                   indices, strict=True):
            assert torch.equal(bx, x[index]) and torch.equal(by, y[index])  # while it is used
        kept.append([b.data_ptr() for b in buffers])
    assert kept[0] == kept[1]  # the same memory the second epoch
