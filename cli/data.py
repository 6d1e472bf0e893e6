"""Datasets of ``fusedmlp train``: sklearn's digits, the lecture's 2-D disc, MNIST IDX files, .npz.

Every loader returns a :class:`Dataset` of float32 features ``[n, d]`` and int64 labels ``[n]``
(numpy arrays) split into train and test. Nothing is ever downloaded. Errors a user can cause
(missing file, wrong arrays) raise :class:`DataError`, which the CLI reports as a one-line
message with a non-zero exit status.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np


class DataError(Exception):
    """A data set could not be loaded (the message says why and what to do)."""


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(initial=0), self.y_test.max(initial=0))) + 1

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test samples, "
            f"{self.num_features} features, {self.num_classes} classes"
        )


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Shuffled train/test split (the same for a given seed)."""
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction))) if n > 1 else 0
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _features(name: str, a, what: str) -> np.ndarray:
    """``a`` as float32 ``[n, features]`` (trailing axes flattened: images become vectors), or a
    :class:`DataError` saying what is wrong with it."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise DataError(f"{name}: {what} must have a sample axis and features, got shape {a.shape}")
    d = math.prod(a.shape[1:])  # not reshape's -1, which fails on 0 samples
    if d == 0:
        raise DataError(f"{name}: {what} has no features, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.complexfloating):  # the cast would drop the imaginary part
        raise DataError(f"{name}: {what} must hold real numbers, got dtype {a.dtype}")
    if a.dtype.kind in "mMV":  # dates, durations, records: numpy casts them to float silently
        raise DataError(f"{name}: {what} must hold numbers, got dtype {a.dtype}")
    try:
        with np.errstate(over="ignore"):  # float64 beyond float32's range: checked below
            out = np.ascontiguousarray(a.reshape(len(a), d), dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise DataError(f"{name}: {what} must hold numbers, got dtype {a.dtype}: {e}") from e
    bad = ~np.isfinite(out)
    if bad.any():  # NaN or Inf (also float64 values beyond float32's range) poison training
        raise DataError(
            f"{name}: {what} has {int(bad.sum())} NaN or infinite values (as float32, "
            "whose largest is about 3.4e38): remove or impute them"
        )
    return out


def _labels(name: str, a, what: str, max_classes: int) -> np.ndarray:
    """``a`` as int64 class labels ``[n]`` in ``0 .. max_classes - 1``, or a :class:`DataError`."""
    a = np.asarray(a)
    if a.dtype == np.bool_:  # False/True: classes 0 and 1
        a = a.astype(np.int64)
    if a.ndim == 1 and np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DataError(
            f"{name}: {what} has {int((~np.isfinite(a)).sum())} NaN or infinite labels: "
            "class labels are integers 0 .. classes - 1"
        )
    if a.ndim != 1 or not (
        np.issubdtype(a.dtype, np.integer)
        or (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)))
    ):
        raise DataError(
            f"{name}: {what} must be a 1-D array of integer class labels, got shape "
            f"{a.shape} of dtype {a.dtype}"
        )
    if a.size and a.min() < 0:
        raise DataError(f"{name}: {what} has negative class labels")
    # Checked before the cast to int64, where uint64 labels >= 2**63 wrap negative; the
    # largest label sizes the output layer, and one far beyond the data (a sample id, a
    # hash) would ask for more memory than any machine has.
    if a.size and a.max() >= max_classes:
        raise DataError(
            f"{name}: {what} has class label {a.max()}, but {max_classes // 10} samples allow at "
            f"most {max_classes} classes (10 per sample): labels must be 0 .. classes - 1"
        )
    return a.astype(np.int64)


def _finish(name, x_train, y_train, x_test, y_test) -> Dataset:
    n_samples = sum(np.size(a) for a in (y_train, y_test))
    max_classes = 10 * n_samples

    ds = Dataset(
        name,
        _features(name, x_train, "X"),
        _labels(name, y_train, "y", max_classes),
        _features(name, x_test, "X"),
        _labels(name, y_test, "y", max_classes),
    )
    for part, xs, ys in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if len(xs) != len(ys):
            raise DataError(
                f"{name}: the {part} set's X has {len(xs)} samples but its y has {len(ys)}"
            )
    if len(ds.x_train) == 0 or len(ds.x_test) == 0:
        raise DataError(f"{name}: needs at least one train and one test sample")
    if ds.x_train.shape[1] != ds.x_test.shape[1]:
        raise DataError(
            f"{name}: train samples have {ds.x_train.shape[1]} features but test samples have "
            f"{ds.x_test.shape[1]} (shapes {np.shape(x_train)} and {np.shape(x_test)})"
        )
    classes = np.union1d(ds.y_train, ds.y_test)
    if len(classes) < 2:
        raise DataError(
            f"{name}: every label is {classes[0]}: a classifier needs at least two classes"
        )
    return ds


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 samples, shipped in the package)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            "the digits data set comes with scikit-learn, which is not installed: "
            "pip install 'fusedmlp[examples]' (or scikit-learn), or use --dataset disc"
        ) from e
    bunch = sk_load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    return _finish("digits", *split(x, bunch.target, test_fraction, seed))


def make_disc(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The lecture's 2-D "disc" problem: points uniform in [-1, 1]^2, label 1 inside the disc
    of radius sqrt(2/pi) centred at 0 (area 2: half of the square, so the classes balance)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, 2)).astype(np.float32)
    y = ((x**2).sum(1) < 2.0 / math.pi).astype(np.int64)
    return x, y


def load_disc(seed: int = 0, n_train: int = 1000, n_test: int = 1000) -> Dataset:
    x_train, y_train = make_disc(n_train, seed)
    x_test, y_test = make_disc(n_test, seed + 1_000_003)
    return _finish("disc", x_train, y_train, x_test, y_test)


def load_npz(path: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """A user's ``.npz`` with arrays ``X`` [n, ...] and ``y`` [n] (integer labels), split
    randomly; or with ``X_train, y_train, X_test, y_test``, used as given."""
    if os.path.isdir(path):
        raise DataError(f"--data {path} is a directory, not a .npz file")
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not zipfile.is_zipfile(path):  # else np.load tries it as a pickle or a .npy
        what = "a single array (.npy)" if magic == b"\x93NUMPY" else "not a zip archive"
        raise DataError(
            f"cannot read {path} as a numpy .npz file: it is {what}; write one with "
            "numpy.savez(path, X=..., y=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f"cannot read {path} as a numpy .npz file: {e}") from e
    name = os.path.basename(path)
    if {"X_train", "y_train", "X_test", "y_test"} <= arrays.keys():
        return _finish(
            name, arrays["X_train"], arrays["y_train"], arrays["X_test"], arrays["y_test"]
        )
    if not {"X", "y"} <= arrays.keys():
        raise DataError(
            f"{path} must hold arrays 'X' and 'y' (or X_train, y_train, X_test, y_test); "
            f"found {sorted(arrays) or 'none'}"
        )
    x, y = np.asarray(arrays["X"]), np.asarray(arrays["y"])
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(
            f"{path}: X and y must be arrays of samples, got shapes {x.shape}, {y.shape}"
        )
    if len(x) != len(y):
        raise DataError(f"{path}: X has {len(x)} samples but y has {len(y)}")
    if len(x) < 2:
        raise DataError(f"{path}: needs at least 2 samples, got {len(x)}")
    # checked whole, before the split: a message names the file's shapes, not a split's
    x, y = _features(name, x, "X"), _labels(name, y, "y", 10 * len(y))
    return _finish(name, *split(x, y, test_fraction, seed))


MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _idx_candidates(base: str) -> list[str]:
    dotted = base.replace("-idx", ".idx")  # the spelling of some mirrors: train-images.idx3-ubyte
    return [base, base + ".gz", dotted, dotted + ".gz"]


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed or not."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # EOFError, zlib.error: a broken .gz
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX file ({len(data)} bytes; its header of {ndim} dimensions "
            f"needs {header})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[data[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: np.prod overflows int64
    if len(data) - header != expected:
        raise DataError(
            f"{path}: truncated or corrupt IDX file (shape {shape} needs {expected} bytes, "
            f"found {len(data) - header})"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_mnist(data_dir: str | None) -> Dataset:
    """MNIST (or Fashion-MNIST, or any data in the same layout) from IDX files in ``data_dir``:
    train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
    t10k-labels-idx1-ubyte, each optionally ``.gz``. Never downloads."""
    if data_dir is None:
        raise DataError(
            "--dataset mnist needs --data-dir DIR holding the MNIST IDX files "
            f"({', '.join(MNIST_FILES.values())}, optionally .gz); fusedmlp never downloads"
        )
    if not os.path.isdir(data_dir):
        if os.path.exists(data_dir):
            raise DataError(f"--data-dir {data_dir} is a file, not a directory")
        raise DataError(f"data directory not found: {data_dir}")
    arrays, paths = {}, {}
    for key, base in MNIST_FILES.items():
        for name in _idx_candidates(base):
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                arrays[key], paths[key] = read_idx(path), path
                break
        else:
            raise DataError(
                f"missing MNIST file {os.path.join(data_dir, base)} (or {base}.gz) in {data_dir}; "
                "fusedmlp never downloads: put the four IDX files there"
            )
    n_labels = np.size(arrays["y_train"]) + np.size(arrays["y_test"])  # a 0-d file has no len()
    for part in ("train", "test"):  # each file checked by name: the message says which it is
        x, y = f"x_{part}", f"y_{part}"
        images = arrays[x]
        if images.dtype == np.uint8:  # MNIST's bytes 0..255 to [0, 1]; other types as they are
            images = images.astype(np.float32) / 255.0
        arrays[x] = _features(paths[x], images, "the image file")
        arrays[y] = _labels(paths[y], arrays[y], "the label file", 10 * n_labels)
        if len(arrays[x]) != len(arrays[y]):
            raise DataError(
                f"{paths[x]} holds {len(arrays[x])} images but {paths[y]} holds "
                f"{len(arrays[y])} labels"
            )
    return _finish(
        "mnist", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
    )


def load(
    dataset: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
) -> Dataset:
    """The data set the CLI options name: ``--data`` (a .npz), ``--data-dir`` (MNIST IDX files,
    implies ``--dataset mnist``) or ``--dataset`` (default digits)."""
    if data is not None:
        if dataset is not None or data_dir is not None:
            raise DataError("--data replaces --dataset and --data-dir: give only one of them")
        return load_npz(data, seed=seed)
    if data_dir is not None and dataset not in (None, "mnist"):
        raise DataError(f"--data-dir is for --dataset mnist, not --dataset {dataset}")
    dataset = dataset or ("mnist" if data_dir is not None else "digits")
    if dataset == "mnist":
        return load_mnist(data_dir)
    if dataset == "disc":
        return load_disc(seed=seed)
    if dataset == "digits":
        return load_digits(seed=seed)
    raise DataError(f"unknown dataset {dataset!r}: expected digits, disc or mnist")
