"""Datasets as ``TensorDataset`` pairs (train, test). Nothing here ever downloads.

- MNIST-1D is generated locally with the ``mnist1d`` package and cached as ``.npz``.
- MNIST / Fashion-MNIST (IDX files) and CIFAR-10 (python pickle batches) are read from a
  directory the user filled beforehand; missing files raise ``FileNotFoundError`` saying where
  to get them.

Images are standardised with each dataset's published constants (``NORMALIZATION``), never
with statistics of the (private) training images.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import math
import os
import pickle
import random
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "load_cifar10",
    "load_dataset",
    "load_idx",
    "load_mnist",
    "load_mnist1d",
    "split_validation",
]

PathLike = str | os.PathLike[str]
Split = tuple[TensorDataset, TensorDataset]


# ---------------------------------------------------------------------------------------- MNIST-1D

def _cache_dir(cache_dir: PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("DPLIS_CACHE") or Path.home() / ".cache" / "dplis")


def _generate_mnist1d(num_samples: int, seed: int, train_split: float) -> dict[str, np.ndarray]:
    import mnist1d.data  # imports matplotlib: keep it off the `import dplis.data` path

    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    # make_dataset reseeds the global `random` and `numpy.random` RNGs; give the caller theirs back
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = mnist1d.data.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or unreadable: regenerate


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temporary file + rename); silently skip if the directory is unusable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load_mnist1d(num_samples: int = 20000, seed: int = 0, train_split: float = 0.8, *,
                 cache_dir: PathLike | None = None) -> Split:
    """MNIST-1D (Greydanus 2020), generated locally: x float32 [N, 40], y int64 [N] in 0..9.

    ``num_samples`` is rounded down to a multiple of 10 (equal classes), n; the first
    ``int(n * train_split)`` examples form the training set (``load_mnist1d(25)``: 16 and 4).
    The arrays are cached in ``cache_dir`` (default ``$DPLIS_CACHE`` or ``~/.cache/dplis``)
    under a name built from the arguments and the mnist1d version; an unwritable cache
    directory just disables caching.
    The global ``random`` / ``numpy.random`` states are left unchanged.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"num_samples must be an int >= 10, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    n = num_samples // 10 * 10
    if not 0.0 < train_split < 1.0 or not 0 < int(n * train_split) < n:
        raise ValueError(
            f"train_split must be in (0, 1) and leave both splits non-empty for {n} samples, "
            f"got {train_split!r}"
        )
    version = importlib.metadata.version("mnist1d")
    path = _cache_dir(cache_dir) / f"mnist1d-{version}-n{num_samples}-s{seed}-t{train_split!r}.npz"
    arrays = _read_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d(num_samples, seed, train_split)
        _write_cache(path, arrays)

    def split(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x.astype(np.float32)),
                             torch.from_numpy(y.astype(np.int64)))

    return split(arrays["x"], arrays["y"]), split(arrays["x_test"], arrays["y_test"])


# --------------------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed (detected from its content).

    Layout: magic ``00 00 <dtype code> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data
    in C order. Returns a writable array of that shape in native byte order: uint8, int8, int16,
    int32, float32 or float64 for codes 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E.
    Raises ``ValueError`` (naming the file) for a bad magic number, unknown dtype code, truncated
    header, corrupt gzip stream or a data length that does not match the sizes.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[:2] != b"\x00\x00":
        raise ValueError(
            f"{path}: not an IDX file (magic starts with {raw[:2].hex()}, expected 0000)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dimensions)"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data is {len(raw) - header} bytes, but shape {shape} of {dtype.name} "
            f"needs {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a native-order, writable copy


# ------------------------------------------------------------------------------------------ images

# Published per-dataset constants (of /255 pixels), the values torchvision's examples use: the
# scaling must not come from the private training images, whose statistics no ε covers
NORMALIZATION = {
    "MNIST": ((0.1307,), (0.3081,)),
    "Fashion-MNIST": ((0.2860,), (0.3530,)),
    "CIFAR-10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _normalize(images: np.ndarray, dataset: str) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 ``(images / 255 - mean[c]) / std[c]`` with the dataset's
    published constants (``NORMALIZATION``)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                 for v in NORMALIZATION[dataset])
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std)


def _check_labels(labels: np.ndarray, where: str) -> torch.Tensor:
    """Class labels 0..9 as int64 [N]."""
    if labels.size and not (labels.min() >= 0 and labels.max() <= 9):
        raise ValueError(f"{where}: labels must be in 0..9, "
                         f"got range {labels.min()}..{labels.max()}")
    return torch.from_numpy(labels.astype(np.int64))


# -------------------------------------------------------------------------- MNIST / Fashion-MNIST

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# the training images' mean pixel (/255) of each: the file names are the same, the content not
_MNIST_MEAN = {name: NORMALIZATION[name][0][0] for name in ("MNIST", "Fashion-MNIST")}


def _find_mnist_files(data_dir: Path, fashion: bool) -> dict[str, Path]:
    subdir = "FashionMNIST" if fashion else "MNIST"
    # torchvision's folder names the dataset; the shared file names in data_dir do not
    searched = [data_dir / subdir / "raw", data_dir]
    for directory in searched:
        found = {}
        for key, name in _MNIST_FILES.items():
            # the original hyphenated names, or with a dot ("train-images.idx3-ubyte", Kaggle's)
            spellings = (name, name.replace("-idx", ".idx"))
            candidates = [directory / f"{n}{gz}" for n in spellings for gz in ("", ".gz")]
            found[key] = next((c for c in candidates if c.is_file()), None)
        if all(found.values()):
            return found
    names = ", ".join(f"{n}[.gz]" for n in _MNIST_FILES.values()) + \
        " (or spelled train-images.idx3-ubyte etc.)"
    source = (
        "https://github.com/zalandoresearch/fashion-mnist" if fashion
        else "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of yann.lecun.com/exdb/mnist)"
    )
    raise FileNotFoundError(
        f"{'Fashion-MNIST' if fashion else 'MNIST'} files not found: looked for {names} in "
        f"{' and '.join(str(d) for d in searched)}. dplis never downloads; get the four files "
        f"from {source}, or run torchvision.datasets.{subdir}(root={str(data_dir)!r}, "
        "download=True) once on a machine with internet."
    )


def _load_mnist_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_idx(images_path), load_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, H, W], "
                         f"got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected labels [N], got shape {list(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels")
    return images[:, None], labels


def load_mnist(data_dir: PathLike, fashion: bool = False) -> Split:
    """MNIST or Fashion-MNIST from local IDX files: x float32 [N, 1, 28, 28], y int64 [N].

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``) in
    torchvision's ``data_dir/MNIST/raw`` (``FashionMNIST/raw``), then in ``data_dir``. The two
    datasets share these names; training images whose mean pixel is the other dataset's are
    refused (ValueError).
    Pixels are scaled to [0, 1], then standardised with the dataset's published mean and std
    (``NORMALIZATION``), not statistics of the private training images.
    """
    data_dir = Path(data_dir)
    files = _find_mnist_files(data_dir, fashion)
    x_train, y_train = _load_mnist_split(files["train_images"], files["train_labels"])
    x_test, y_test = _load_mnist_split(files["test_images"], files["test_labels"])
    name = "Fashion-MNIST" if fashion else "MNIST"
    # a sanity check of the files only: it refuses them or not, and shapes no output
    _check_not_the_other(float(x_train.mean(dtype=np.float64)) / 255, name, files["train_images"])
    return (
        TensorDataset(_normalize(x_train, name),
                      _check_labels(y_train, str(files["train_labels"]))),
        TensorDataset(_normalize(x_test, name), _check_labels(y_test, str(files["test_labels"]))),
    )


def _check_not_the_other(mean: float, wanted: str, where: Path) -> None:
    """Refuse MNIST's files loaded as Fashion-MNIST and the reverse (they share file names):
    the training images' mean pixel within 0.01 of the other dataset's, and not of ``wanted``'s."""
    other = next(name for name in _MNIST_MEAN if name != wanted)
    if abs(mean - _MNIST_MEAN[other]) < 0.01 and abs(mean - _MNIST_MEAN[wanted]) >= 0.01:
        raise ValueError(
            f"{where}: these look like {other}'s images, not {wanted}'s (mean pixel {mean:.4f}; "
            f"{other} {_MNIST_MEAN[other]}, {wanted} {_MNIST_MEAN[wanted]}). Both datasets use "
            "the same file names: keep each in its own folder, torchvision's data_dir/MNIST/raw "
            "and data_dir/FashionMNIST/raw")


# ---------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


def _find_cifar_dir(data_dir: Path) -> Path:
    searched = [data_dir, data_dir / "cifar-10-batches-py"]
    for directory in searched:
        if all((directory / name).is_file() for name in _CIFAR_TRAIN + _CIFAR_TEST):
            return directory
    raise FileNotFoundError(
        f"CIFAR-10 batches not found: looked for {', '.join(_CIFAR_TRAIN + _CIFAR_TEST)} in "
        f"{' and '.join(str(d) for d in searched)}. dplis never downloads; get "
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
        "into data_dir."
    )


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a readable pickle ({e})") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise ValueError(f"{path}: missing key {key!r} (keys: {sorted(map(repr, batch))})")

    data, labels = np.asarray(get("data")), np.asarray(get("labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} "
                         f"{list(data.shape)}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected {len(data)} integer labels, got {labels.dtype} "
                         f"{list(labels.shape)}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_split(directory: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_load_cifar_batch(directory / name) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10(data_dir: PathLike) -> Split:
    """CIFAR-10 from the python pickle batches: x float32 [N, 3, 32, 32], y int64 [N].

    Reads ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` from ``data_dir`` or
    ``data_dir/cifar-10-batches-py``; each channel is scaled to [0, 1], then standardised with
    CIFAR-10's published mean and std (``NORMALIZATION``). Unpickling runs arbitrary code from
    the file: only use batches from a trusted source.
    """
    directory = _find_cifar_dir(Path(data_dir))
    x_train, y_train = _load_cifar_split(directory, _CIFAR_TRAIN)
    x_test, y_test = _load_cifar_split(directory, _CIFAR_TEST)
    return (
        TensorDataset(_normalize(x_train, "CIFAR-10"), _check_labels(y_train, str(directory))),
        TensorDataset(_normalize(x_test, "CIFAR-10"), _check_labels(y_test, str(directory))),
    )


# --------------------------------------------------------------------------------------- dispatch

DATASETS = ("mnist1d", "mnist", "fashion-mnist", "cifar10")


def load_dataset(name: str, data_dir: PathLike | None = None, **kw: Any) -> Split:
    """(train, test) ``TensorDataset`` for ``name`` in ``DATASETS``; ``kw`` go to the loader.

    ``data_dir`` is required for the real datasets (mnist, fashion-mnist, cifar10); for mnist1d it
    is optional and, if given, used as the cache directory.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "mnist1d":
        return load_mnist1d(cache_dir=data_dir, **kw)
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from local files: pass data_dir")
    if name == "cifar10":
        return load_cifar10(data_dir, **kw)
    return load_mnist(data_dir, fashion=name == "fashion-mnist", **kw)


def split_validation(dataset: TensorDataset, fraction: float, seed: int) -> Split:
    """Deterministic random split of ``dataset`` into (train, validation) ``TensorDataset``s.

    The validation part holds ``round(fraction * N)`` examples chosen by a permutation seeded
    with ``seed``; both parts keep the original order. Tune hyper-parameters on it, never on the
    test set.
    """
    if not isinstance(dataset, TensorDataset):
        raise TypeError(f"dataset must be a TensorDataset, got {type(dataset).__name__}")
    n = len(dataset)
    n_val = round(fraction * n) if 0.0 < fraction < 1.0 else 0
    if not 0 < n_val < n:
        raise ValueError(f"fraction must be in (0, 1) and leave both parts of the {n} examples "
                         f"non-empty, got {fraction!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (TensorDataset(*(t[train_idx] for t in dataset.tensors)),
            TensorDataset(*(t[val_idx] for t in dataset.tensors)))
