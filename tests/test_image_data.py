"""Tests for :mod:`mcmc_unlearner.image_data`: digits split, IDX and CIFAR readers, safety, errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from mcmc_unlearner.image_data import (
    ImageData,
    class_indices,
    find_mnist_files,
    load_dataset,
    mnist_search_dirs,
    read_cifar_batch,
    read_idx,
    subset_by_class,
)


# --- helpers writing real on-disk formats -----------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian uint32 dims)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(root, folder: str | None, gz: bool, rng, skip: str | None = None) -> dict[str, np.ndarray]:
    """Write four small IDX files under ``root/folder/raw`` (torchvision) or directly in ``root`` (``folder=None``,
    the Debian layout); ``skip`` leaves out one file."""
    raw = root / folder / "raw" if folder else root
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        if stem == skip:
            continue
        if gz:
            with gzip.open(raw / f"{stem}.gz", "wb") as f:
                f.write(_idx_bytes(arr))
        else:
            (raw / stem).write_bytes(_idx_bytes(arr))
    return arrays


class _Py2StylePickler(pickle._Pickler):
    """Protocol-2 pickler that writes ``bytes`` as Python-2 ``str`` (BINSTRING) and references
    ``numpy.core.multiarray._reconstruct``, as the cPickle-written CIFAR batch files do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(len)] = save_global


def _py2_pickle(obj, path) -> None:
    with open(path, "wb") as f:
        _Py2StylePickler(f, protocol=2).dump(obj)


def _cifar_batch(rng, n: int, label_key: bytes, n_classes: int) -> tuple[dict, np.ndarray, np.ndarray]:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, n_classes, n)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        label_key: [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) % 20 for v in labels]
    return batch, data, labels


# --- digits -----------------------------------------------------------------------------------------
def test_digits_shapes_range_and_stratification():
    d = load_dataset("digits", seed=0)
    assert isinstance(d, ImageData)
    assert d.name == "digits" and d.n_classes == 10 and d.in_shape == (1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_test.shape[1:] == (1, 8, 8)
    assert d.n_train + d.n_test == 1797 and d.n_test == 450
    for x in (d.x_train, d.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert d.x_train.max() == 1.0
    total = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10).double()
    test_counts = torch.bincount(d.y_test, minlength=10).double()
    assert torch.all((test_counts - total * d.n_test / 1797).abs() <= 1.0)


def test_digits_deterministic_per_seed():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


# --- MNIST-format IDX -------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_roundtrip(tmp_path, name, folder, gz):
    arrays = _write_mnist(tmp_path, folder, gz, np.random.default_rng(0))
    d = load_dataset(name, data_dir=tmp_path)
    assert d.name == name and d.n_classes == 10 and d.in_shape == (1, 32, 32)
    assert d.x_train.shape == (7, 1, 32, 32) and d.x_test.shape == (3, 1, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    expected = np.pad(arrays["train-images-idx3-ubyte"], ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), expected)
    np.testing.assert_array_equal(d.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(
        (d.x_test[:, 0, 2:30, 2:30] * 255).round().to(torch.uint8).numpy(), arrays["t10k-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(d.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def _assert_matches(d: ImageData, arrays: dict[str, np.ndarray]) -> None:
    expected = np.pad(arrays["train-images-idx3-ubyte"], ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), expected)
    np.testing.assert_array_equal(d.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(d.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("gz", [False, True])
def test_debian_layout_files_directly_in_the_folder(tmp_path, gz):
    folder = tmp_path / "fashion-mnist"
    arrays = _write_mnist(folder, None, gz, np.random.default_rng(5))
    _assert_matches(load_dataset("fashion-mnist", data_dir=folder), arrays)
    # the parent folder works too (data_dir=/usr/share/datasets)
    _assert_matches(load_dataset("fmnist", data_dir=tmp_path), arrays)
    assert find_mnist_files("fashion-mnist", folder)["train-images-idx3-ubyte"].parent == folder


def test_torchvision_layout_wins_over_flat_files(tmp_path):
    flat = _write_mnist(tmp_path, None, True, np.random.default_rng(6))
    tv = _write_mnist(tmp_path, "FashionMNIST", False, np.random.default_rng(7))
    assert not np.array_equal(flat["train-labels-idx1-ubyte"], tv["train-labels-idx1-ubyte"])
    _assert_matches(load_dataset("fashion-mnist", data_dir=tmp_path), tv)


def test_files_are_never_mixed_across_folders(tmp_path):
    # three files in the torchvision folder, all four directly in the folder: the complete folder is used
    _write_mnist(tmp_path, "FashionMNIST", False, np.random.default_rng(8), skip="t10k-labels-idx1-ubyte")
    flat = _write_mnist(tmp_path, None, False, np.random.default_rng(9))
    _assert_matches(load_dataset("fashion-mnist", data_dir=tmp_path), flat)


def test_mnist_is_not_read_from_a_fashion_mnist_folder(tmp_path):
    # the two data sets share file names: a folder named after Fashion-MNIST never counts as MNIST
    folder = tmp_path / "fashion-mnist"
    _write_mnist(folder, None, True, np.random.default_rng(10))
    assert folder not in mnist_search_dirs("mnist", folder)
    with pytest.raises(FileNotFoundError, match="'mnist' not found"):
        load_dataset("mnist", data_dir=folder)


def test_missing_file_message_names_file_folders_and_fix(tmp_path):
    folder = tmp_path / "fm"
    _write_mnist(folder, None, True, np.random.default_rng(11), skip="t10k-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("fashion-mnist", data_dir=folder)
    msg = str(exc.value)
    assert f"{folder}: missing t10k-images-idx3-ubyte\n" in msg  # the one absent file, in the folder searched
    assert f"{folder / 'FashionMNIST' / 'raw'}: no such folder" in msg
    assert f"{folder / 'fashion-mnist'}: no such folder" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg


_REAL_FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(
    find_mnist_files("fashion-mnist", _REAL_FMNIST) is None, reason="Fashion-MNIST (dataset-fashion-mnist) absent"
)
def test_real_fashion_mnist_from_the_debian_package():
    d = load_dataset("fashion-mnist", data_dir=_REAL_FMNIST)
    assert d.x_train.shape == (60000, 1, 32, 32) and d.x_test.shape == (10000, 1, 32, 32)
    assert torch.bincount(d.y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(d.y_test, minlength=10).tolist() == [1000] * 10
    assert float(d.x_train[:, :, :2].abs().max()) == 0.0  # the 2-pixel zero padding
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) == 1.0


def test_read_idx_other_dtype(tmp_path):
    arr = (np.arange(6) - 3).astype(">i4").reshape(2, 3)
    p = tmp_path / "x.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes())
    out = read_idx(p)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype("int32")


def test_truncated_idx_raises_value_error(tmp_path):
    arrays = _write_mnist(tmp_path, "MNIST", False, np.random.default_rng(1))
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(_idx_bytes(arrays["train-images-idx3-ubyte"])[:-10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", data_dir=tmp_path)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(path)
    path.write_bytes(b"\x1f\x8b\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_truncated_gzip_idx_raises_value_error(tmp_path):
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(_idx_bytes(np.zeros(100, np.uint8)))[:-12])
    with pytest.raises(ValueError, match=r"corrupt gzip|truncated"):
        read_idx(p)


# --- CIFAR pickles ----------------------------------------------------------------------------------
def test_cifar10_batches_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    train_x, train_y = [], []
    for i in range(1, 6):
        batch, x, y = _cifar_batch(rng, 4 + i, b"labels", 10)
        _py2_pickle(batch, d / f"data_batch_{i}")
        train_x.append(x)
        train_y.append(y)
    batch, test_x, test_y = _cifar_batch(rng, 6, b"labels", 10)
    # the test batch is written like a Python-3 pickle (bytes keys, numpy._core global).
    (d / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))

    data = load_dataset("cifar10", data_dir=tmp_path)
    assert data.name == "cifar10" and data.n_classes == 10 and data.in_shape == (3, 32, 32)
    x = np.concatenate(train_x).reshape(-1, 3, 32, 32).astype(np.float32) / 255
    np.testing.assert_array_equal(data.x_train.numpy(), x)
    np.testing.assert_array_equal(data.y_train.numpy(), np.concatenate(train_y))
    np.testing.assert_array_equal(data.x_test.numpy(), test_x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    np.testing.assert_array_equal(data.y_test.numpy(), test_y)
    assert data.y_train.dtype == torch.int64
    # channel layout: first 1024 values are the red plane, row-major.
    assert data.x_test[0, 0, 0, 1].item() == pytest.approx(test_x[0, 1] / 255)
    assert data.x_test[0, 1, 0, 0].item() == pytest.approx(test_x[0, 1024] / 255)


def test_cifar100_batches_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    tr, tr_x, tr_y = _cifar_batch(rng, 9, b"fine_labels", 100)
    te, te_x, te_y = _cifar_batch(rng, 5, b"fine_labels", 100)
    _py2_pickle(tr, d / "train")
    _py2_pickle(te, d / "test")
    data = load_dataset("cifar-100", data_dir=tmp_path)
    assert data.name == "cifar100" and data.n_classes == 100
    np.testing.assert_array_equal(data.x_train.numpy(), tr_x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    np.testing.assert_array_equal(data.y_train.numpy(), tr_y)
    np.testing.assert_array_equal(data.x_test.numpy(), te_x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    np.testing.assert_array_equal(data.y_test.numpy(), te_y)
    _, coarse = read_cifar_batch(d / "train", label_key="coarse_labels")
    np.testing.assert_array_equal(coarse, tr_y % 20)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('sys').exit(3)",))


def test_malicious_pickle_is_refused(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    marker = tmp_path / "pwned"
    (d / "train").write_bytes(pickle.dumps({b"data": _Evil(marker), b"fine_labels": [0]}, protocol=4))
    _py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}, d / "test")
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os|nt)\.system"):
        load_dataset("cifar100", data_dir=tmp_path)
    assert not marker.exists()
    (d / "train").write_bytes(pickle.dumps(_EvilEval(), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        read_cifar_batch(d / "train", "fine_labels")
    assert "sys" in sys.modules  # still running


def test_malformed_cifar_batch(tmp_path):
    p = tmp_path / "batch"
    _py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, p)
    with pytest.raises(ValueError, match="3072"):
        read_cifar_batch(p)
    _py2_pickle([1, 2, 3], p)
    with pytest.raises(ValueError, match="dict"):
        read_cifar_batch(p)


# --- errors and helpers -----------------------------------------------------------------------------
def test_missing_files_name_paths_and_download_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(exc.value)
    assert f"{tmp_path / 'MNIST' / 'raw'}: no such folder" in msg and "--download" in msg
    assert f"{tmp_path}: missing train-images-idx3-ubyte, train-labels-idx1-ubyte" in msg
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(exc.value)
    assert "--download" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_download_without_torchvision_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"mcmc-unlearner\[vision\]") as exc:
        load_dataset("cifar100", data_dir=tmp_path, download=True)
    assert str(tmp_path / "cifar-100-python" / "train") in str(exc.value)


def test_download_with_a_broken_torchvision_names_the_mismatch(tmp_path, monkeypatch):
    """PyPI's torchvision beside a CPU-only torch fails on import with a RuntimeError (an operator it expects is
    missing): the loader says so and how to fix it, instead of a traceback from inside torchvision."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.delitem(sys.modules, "torchvision.datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="does not import beside torch") as exc:
        load_dataset("cifar100", data_dir=tmp_path, download=True)
    assert "torchvision::nms" in str(exc.value) and str(tmp_path / "cifar-100-python" / "train") in str(exc.value)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def test_class_indices_and_subset():
    y = torch.tensor([2, 0, 2, 1, 2])
    idx = class_indices(y, 2)
    assert idx.dtype == torch.int64 and idx.tolist() == [0, 2, 4]
    assert class_indices(y, 7).numel() == 0
    x = torch.arange(5.0)[:, None]
    xs, ys = subset_by_class(x, y, 0)
    assert xs.tolist() == [[1.0]] and ys.tolist() == [0]


def test_module_imports_without_torchvision():
    import mcmc_unlearner.image_data as mod

    assert "torchvision" not in vars(mod)


# --- telling MNIST and Fashion-MNIST apart, loader messages, CIFAR folder and pickle errors ---------------------
_FMNIST_FIRST = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the official training files' first labels
_MNIST_FIRST = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def _write_idx_set(folder, first_labels, seed: int) -> np.ndarray:
    """Four small plain IDX files whose training labels start with ``first_labels``; returns the training labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y = np.concatenate([np.array(first_labels, np.uint8), rng.integers(0, 10, 4, dtype=np.uint8)])
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (y.size, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": y,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        (folder / stem).write_bytes(_idx_bytes(arr))
    return y


def test_mnist_and_fashion_mnist_told_apart_by_the_official_first_labels(tmp_path):
    data = tmp_path / "data"  # a plain folder name (the default ./data) holding Fashion-MNIST's files
    _write_idx_set(data, _FMNIST_FIRST, 0)
    assert load_dataset("fashion-mnist", data).y_train[:10].tolist() == _FMNIST_FIRST
    with pytest.raises(FileNotFoundError, match="holds the fashion-mnist files") as exc:
        load_dataset("mnist", data)
    assert f"{data}: holds fashion-mnist's files" in str(exc.value) and str(_FMNIST_FIRST) in str(exc.value)
    # the search goes on past the passed-over folder: MNIST files in data/mnist are found
    y = _write_idx_set(data / "mnist", _MNIST_FIRST, 1)
    np.testing.assert_array_equal(load_dataset("mnist", data).y_train.numpy(), y)
    # and the other way: MNIST's files in a folder named after nothing are not Fashion-MNIST
    with pytest.raises(FileNotFoundError, match="holds the mnist files"):
        load_dataset("fashion-mnist", data / "mnist")
    # files that are neither official set (a synthetic set) are not refused, whatever the folder's name
    y = _write_idx_set(tmp_path / "mnist", [1, 2, 3], 2)
    np.testing.assert_array_equal(load_dataset("fashion-mnist", tmp_path / "mnist").y_train.numpy(), y)


@pytest.mark.skipif(
    find_mnist_files("fashion-mnist", _REAL_FMNIST) is None, reason="Fashion-MNIST (dataset-fashion-mnist) absent"
)
def test_real_fashion_mnist_files_in_a_plain_folder_are_not_mnist(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in find_mnist_files("fashion-mnist", _REAL_FMNIST).values():
        (data / p.name).symlink_to(p)
    with pytest.raises(FileNotFoundError, match="holds the fashion-mnist files"):
        load_dataset("mnist", data)


def test_idx_loader_messages_name_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "fm"
    _write_mnist(folder, None, False, np.random.default_rng(12))
    labels = folder / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.full(7, 12, np.uint8)))
    with pytest.raises(ValueError, match=rf"{labels}: labels outside \[0, 10\): 12\.\.12"):
        load_dataset("fashion-mnist", folder)
    labels.unlink()
    labels.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte is a dangling symlink"):
        load_dataset("fashion-mnist", folder)
    labels.unlink()
    labels.mkdir()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte is a directory, not a file"):
        load_dataset("fashion-mnist", folder)
    labels.rmdir()
    labels.write_bytes(gzip.compress(_idx_bytes(np.zeros(7, np.uint8))))
    with pytest.raises(ValueError, match=r"gzip-compressed .*rename it to train-labels-idx1-ubyte\.gz"):
        load_dataset("fashion-mnist", folder)


def _write_cifar10(d, rng) -> np.ndarray:
    d.mkdir(parents=True)
    xs = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch, x, _ = _cifar_batch(rng, 3, b"labels", 10)
        _py2_pickle(batch, d / name)
        xs.append(x)
    return np.concatenate(xs[:5])


def test_cifar_batch_folder_itself_is_accepted(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    x = _write_cifar10(d, np.random.default_rng(13))
    data = load_dataset("cifar10", data_dir=d)  # the folder of the batches, not its parent
    np.testing.assert_array_equal(data.x_train.numpy(), x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    with pytest.raises(FileNotFoundError, match=f"or all of them in {tmp_path / 'elsewhere'} itself"):
        load_dataset("cifar10", data_dir=tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda b: b[:3000], "truncated pickle"),
        (gzip.compress, "gzip-compressed data, not a pickle"),
        (lambda b: b"", "empty file"),
        (
            lambda b: pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0] * 3}, protocol=5),
            r"refusing to load global numpy\._?core\.numeric\._frombuffer",
        ),
    ],
)
def test_corrupt_cifar_batch_is_a_value_error_naming_the_file(tmp_path, damage, problem):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar10(d, np.random.default_rng(14))
    bad = d / "data_batch_4"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(ValueError, match=rf"{bad}: {problem}") as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert isinstance(exc.value, pickle.UnpicklingError)  # still what callers caught before
