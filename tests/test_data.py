"""Dataset loaders on small generated / fake files (nothing downloads)."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import mnist1d.data
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dplis.data import (
    DATASETS,
    load_cifar10,
    load_dataset,
    load_idx,
    load_mnist,
    load_mnist1d,
    split_validation,
)

# ---------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_shapes_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path / "cache"))
    train, test = load_mnist1d(num_samples=200, seed=1)
    x, y = train.tensors
    assert x.shape == (160, 40) and x.dtype == torch.float32
    assert y.shape == (160,) and y.dtype == torch.int64
    assert test.tensors[0].shape == (40, 40) and test.tensors[1].dtype == torch.int64
    assert set(torch.cat([y, test.tensors[1]]).tolist()) == set(range(10))
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def no_generation(*args, **kwargs):
        raise AssertionError("cache miss: make_dataset was called")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    train2, test2 = load_mnist1d(num_samples=200, seed=1)
    assert torch.equal(train2.tensors[0], x) and torch.equal(test2.tensors[1], test.tensors[1])


def test_mnist1d_seed_changes_data_and_keeps_global_rng(tmp_path):
    np.random.seed(123)
    random.seed(123)
    a, _ = load_mnist1d(num_samples=100, seed=0, cache_dir=tmp_path)
    after_np, after_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    assert (np.random.rand(), random.random()) == (after_np, after_py)
    b, _ = load_mnist1d(num_samples=100, seed=1, cache_dir=tmp_path)
    assert not torch.equal(a.tensors[0], b.tensors[0])
    assert len(list(tmp_path.iterdir())) == 2


def test_mnist1d_unwritable_cache_falls_back(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    train, test = load_mnist1d(num_samples=50, cache_dir=blocker / "cache")
    assert len(train) == 40 and len(test) == 10


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path):
    load_mnist1d(num_samples=50, cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"garbage")
    train, _ = load_mnist1d(num_samples=50, cache_dir=tmp_path)
    assert train.tensors[0].shape == (40, 40)
    assert np.load(cached)["x"].shape == (40, 40)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 5}, "num_samples"),
        ({"num_samples": 100.0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"train_split": 1.0}, "train_split"),
        ({"num_samples": 10, "train_split": 0.05}, "train_split"),
    ],
)
def test_mnist1d_bad_args(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnist1d(cache_dir=tmp_path, **kwargs)


# --------------------------------------------------------------------------------------- IDX files

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
          np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, _CODES[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("dtype", list(_CODES))
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    loaded = load_idx(write_idx(tmp_path / f"a.idx{suffix}", array))
    assert loaded.dtype == np.dtype(dtype) and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, array)
    assert loaded.flags.writeable


def test_idx_gzip_detected_by_content(tmp_path):
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(idx_bytes(np.ones(5, np.uint8))))
    np.testing.assert_array_equal(load_idx(path), np.ones(5, np.uint8))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x00", "unknown IDX dtype code 0x0A"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x00\x00", "2 bytes, but shape \\(3,\\)"),
        (b"\x00\x00\x0c\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00", "5 bytes"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
)
def test_idx_invalid(tmp_path, data, match):
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        load_idx(path)
    assert "bad.idx" in str(info.value)


def test_idx_truncated_gzip_payload(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:-12])
    with pytest.raises(ValueError, match="cut.gz"):
        load_idx(path)


# ------------------------------------------------------------------------------------------- MNIST

def write_fake_mnist(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = False,
                     seed: int = 0, dotted: bool = False) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_test, dtype=np.uint8))
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    for name, array in zip(names, arrays, strict=True):
        name = name.replace("-idx", ".idx") if dotted else name
        write_idx(directory / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])  # "train-images.idx3-ubyte" (Kaggle's names)
def test_mnist_loader(tmp_path, gz, dotted):
    train_images, train_labels, test_images, test_labels = write_fake_mnist(tmp_path, gz=gz,
                                                                            dotted=dotted)
    train, test = load_mnist(tmp_path)
    x, y = train.tensors
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(train_labels).long())
    assert test.tensors[0].shape == (10, 1, 28, 28)
    assert torch.equal(test.tensors[1], torch.from_numpy(test_labels).long())
    # the published constants, not the (private) training images' statistics
    np.testing.assert_allclose(x[:, 0].numpy(), (train_images / 255.0 - 0.1307) / 0.3081,
                               atol=1e-5)
    expected_test = (test_images / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(test.tensors[0][:, 0].numpy(), expected_test, atol=1e-5)


def test_fashion_mnist_torchvision_layout(tmp_path):
    write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    train, test = load_dataset("fashion-mnist", tmp_path)
    assert len(train) == 20 and len(test) == 10
    with pytest.raises(FileNotFoundError):  # the MNIST layout is not Fashion-MNIST's
        load_mnist(tmp_path)


def write_like(directory: Path, mean: float) -> None:
    """Fake IDX files whose training pixels are 0 or 255 with probability ``mean``."""
    write_fake_mnist(directory)
    rng = np.random.default_rng(1)
    images = (rng.random((20, 28, 28)) < mean).astype(np.uint8) * 255
    write_idx(directory / "train-images-idx3-ubyte", images)


@pytest.mark.parametrize("asked, looks_like, mean", [
    ("fashion-mnist", "MNIST", 0.1307), ("mnist", "Fashion-MNIST", 0.2860)])
def test_mnist_and_fashion_files_are_not_mixed_up(tmp_path, asked, looks_like, mean):
    write_like(tmp_path, mean)  # in data_dir: the names do not tell which dataset it is
    with pytest.raises(ValueError, match=f"look like {looks_like}'s images"):
        load_dataset(asked, tmp_path)


def test_torchvision_folder_is_searched_before_data_dir(tmp_path):
    write_like(tmp_path, 0.1307)  # MNIST's files in data_dir
    write_like(tmp_path / "FashionMNIST" / "raw", 0.2860)
    train, _ = load_dataset("fashion-mnist", tmp_path)  # the named folder wins
    assert len(train) == 20
    train, _ = load_mnist(tmp_path)  # MNIST: no MNIST/raw, so data_dir's files
    assert len(train) == 20


def test_mnist_missing_files(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and str(tmp_path / "MNIST" / "raw") in message
    assert "never downloads" in message


def test_mnist_count_mismatch(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match="20 images but .* 19 labels"):
        load_mnist(tmp_path)


def test_mnist_swapped_files(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(20, np.uint8))
    with pytest.raises(ValueError, match=r"images \[N, H, W\]"):
        load_mnist(tmp_path)


def test_mnist_bad_labels(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8))
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------------------- CIFAR-10

def write_fake_cifar(directory: Path, per_batch: int = 4, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"batch_label": name.encode()}
        (directory / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    return batches


def test_cifar10_loader(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    train, test = load_dataset("cifar10", tmp_path)
    x, y = train.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == sum(
        (batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert test.tensors[0].shape == (4, 3, 32, 32)
    # CIFAR-10's published per-channel constants, not the training images' statistics
    mean = np.array([0.4914, 0.4822, 0.4465])[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    for split, raw in ((x, batches["data_batch_1"][b"data"][2]),
                       (test.tensors[0], batches["test_batch"][b"data"][1])):
        index = 2 if split is x else 1
        expected = (raw.reshape(3, 32, 32) / 255.0 - mean) / std
        np.testing.assert_allclose(split[index].numpy(), expected, atol=1e-5)


def test_cifar10_flat_layout_and_missing(tmp_path):
    write_fake_cifar(tmp_path)
    assert len(load_cifar10(tmp_path)[0]) == 20
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*cifar-10-batches-py"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([1, 2], "expected a dict"),
        ({b"labels": [0]}, "missing key 'data'"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"uint8 data \[N, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8 data"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "expected 2 integer labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels must be in 0..9"),
    ],
)
def test_cifar10_invalid_batch(tmp_path, batch, match):
    write_fake_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=match):
        load_cifar10(tmp_path)


def test_cifar10_not_a_pickle(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_1: not a readable pickle"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------- dispatch

def test_load_dataset_dispatch(tmp_path):
    assert DATASETS == ("mnist1d", "mnist", "fashion-mnist", "cifar10")
    train, test = load_dataset("mnist1d", tmp_path, num_samples=50)
    assert len(train) == 40 and len(list(tmp_path.iterdir())) == 1
    write_fake_mnist(tmp_path / "MNIST" / "raw")
    assert len(load_dataset("mnist", tmp_path)[1]) == 10


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*mnist1d, mnist, fashion-mnist"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="pass data_dir"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar10", tmp_path)


# -------------------------------------------------------------------------------- split_validation

def test_split_validation():
    x = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 3)
    dataset = TensorDataset(x, torch.arange(100))
    train, val = split_validation(dataset, 0.2, seed=0)
    assert len(train) == 80 and len(val) == 20
    train_ids, val_ids = set(train.tensors[1].tolist()), set(val.tensors[1].tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(100))
    assert torch.equal(train.tensors[0][:, 0].long(), train.tensors[1])  # rows stay aligned
    again_train, again_val = split_validation(dataset, 0.2, seed=0)
    assert torch.equal(again_val.tensors[1], val.tensors[1])
    assert torch.equal(again_train.tensors[0], train.tensors[0])
    _, other_val = split_validation(dataset, 0.2, seed=1)
    assert not torch.equal(other_val.tensors[1], val.tensors[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001, 0.999, -0.5])
def test_split_validation_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        split_validation(TensorDataset(torch.zeros(10)), fraction, seed=0)


def test_split_validation_needs_tensor_dataset():
    with pytest.raises(TypeError, match="TensorDataset"):
        split_validation([1, 2, 3], 0.5, seed=0)
