"""Datasets and deterministic batching.

Loaders return a :class:`Dataset` of numpy arrays: inputs ``x`` are float32, either images
``(N, H, W, C)`` or vectors ``(N, D)``; labels ``y`` are int32 in ``[0, num_classes)``. Every source of
randomness takes an explicit seed. Batching is a pure function of ``(seed, epoch)`` or of the global step,
so a training loop can resume exactly from any step (:func:`batch_at`).

Problems with the data (a missing or corrupt file, an unknown dataset name) raise :class:`DataError`,
whose message is one line naming the file or dataset and what is wrong.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import pickle
import zlib
from collections.abc import Iterator

import numpy as np

from rate_tuning import memory

FASHION_MNIST_ENV = "RATE_TUNING_FASHION_MNIST"
"""Environment variable that overrides the Fashion-MNIST directory."""

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

CIFAR10_ENV = "RATE_TUNING_CIFAR10"
"""Environment variable giving the CIFAR-10 directory when no path is passed."""

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


class DataError(ValueError):
    """Missing, corrupt or unknown data; the message is one line naming the file or dataset."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of a classification dataset.

    Attributes:
      x_train, x_test: float32 inputs, ``(N, H, W, C)`` for images or ``(N, D)`` for vectors.
      y_train, y_test: int32 labels in ``[0, num_classes)``.
      num_classes: number of classes.
      name: dataset name, as accepted by :func:`load`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(x) != len(y):
                raise DataError(f"dataset {self.name!r}: {split} split has {len(x)} inputs but {len(y)} labels")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"dataset {self.name!r}: train inputs have shape {self.x_train.shape[1:]} "
                            f"but test inputs {self.x_test.shape[1:]}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch axis (e.g. ``(28, 28, 1)`` or ``(64,)``)."""
        return tuple(self.x_train.shape[1:])

    def flattened(self) -> Dataset:
        """Returns the dataset with each input flattened to a vector ``(N, D)``."""
        return dataclasses.replace(self, x_train=self.x_train.reshape(len(self.x_train), -1),
                                   x_test=self.x_test.reshape(len(self.x_test), -1))

    def standardized(self) -> Dataset:
        """Returns the dataset standardised per channel with train statistics (see :func:`standardize`)."""
        x_train, x_test = standardize(self.x_train, self.x_test)
        return dataclasses.replace(self, x_train=x_train, x_test=x_test)


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardises both splits per channel (last axis) with the mean and std of the train split.

    Channels with zero variance in the train split are only centred.

    Args:
      x_train: train inputs, channels on the last axis.
      x_test: test inputs, same trailing shape.

    Returns:
      ``(x_train, x_test)`` as float32.
    """
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    return (((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32))


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def synthetic(n_train: int, n_test: int, dim: int, num_classes: int, seed: int,
              noise: float = 1.0) -> Dataset:
    """Seeded Gaussian mixture: one standard-normal class mean per class, isotropic noise around it.

    Labels are uniform; features are standardised with train statistics.

    Args:
      n_train: number of training examples.
      n_test: number of test examples.
      dim: input dimension.
      num_classes: number of classes (>= 2).
      seed: seed of the means, labels and noise.
      noise: standard deviation of the noise around each class mean.

    Returns:
      A :class:`Dataset` with inputs of shape ``(N, dim)``.
    """
    n_train = _check_positive_int("n_train", n_train)
    n_test = _check_positive_int("n_test", n_test)
    dim = _check_positive_int("dim", dim)
    num_classes = _check_positive_int("num_classes", num_classes, minimum=2)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    n = n_train + n_test  # float64 inputs, their noise and a standardised copy: 3 arrays of (n, dim)
    memory.check_fits(f"synthetic data of {n} x {dim}", 3 * 8 * n * dim + 16 * n, memory.host_available_bytes())
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, dim))
    y = rng.integers(num_classes, size=n_train + n_test)
    x = means[y] + noise * rng.standard_normal((n_train + n_test, dim))
    x_train, x_test = standardize(x[:n_train], x[n_train:])
    y = y.astype(np.int32)
    return Dataset(x_train, y[:n_train], x_test, y[n_train:], num_classes, "synthetic")


def digits(seed: int = 0, test_fraction: float = 0.2, flatten: bool = False) -> Dataset:
    """scikit-learn's handwritten digits (1,797 8×8 images, 10 classes), split by seed.

    Pixels are scaled from ``[0, 16]`` to ``[0, 1]``, then standardised with train statistics.

    Args:
      seed: seed of the random train/test split.
      test_fraction: fraction of the examples in the test split, in ``(0, 1)``, rounded up.
      flatten: return inputs as ``(N, 64)`` vectors instead of ``(N, 8, 8, 1)`` images.

    Returns:
      A :class:`Dataset`.
    """
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    x = (bunch.images / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    n_test = max(1, min(len(x) - 1, math.ceil(test_fraction * len(x))))
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = standardize(x[train], x[test])
    data = Dataset(x_train, y[train], x_test, y[test], 10, "digits")
    return data.flattened() if flatten else data


def _read_bytes(path: str, what: str) -> bytes:
    """Reads a file, decompressing it if its name ends in ``.gz``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{what} file {path} not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{what} file {path} could not be read: {type(e).__name__}: {e}") from None


def read_idx(path: str, magic: int, what: str = "IDX") -> np.ndarray:
    """Reads an unsigned-byte IDX file (as used by MNIST and Fashion-MNIST), gzipped or not.

    The header is the big-endian magic number (``0x0803`` for 3-d images, ``0x0801`` for 1-d labels)
    followed by one big-endian uint32 per dimension; the data must be exactly the product of the dims.

    Args:
      path: file path; read through gzip if it ends in ``.gz``.
      magic: the expected magic number (:data:`IDX_IMAGES_MAGIC` or :data:`IDX_LABELS_MAGIC`).
      what: dataset name for error messages.

    Returns:
      A uint8 array with the shape given in the header.
    """
    raw = _read_bytes(path, what)
    if len(raw) < 4:
        raise DataError(f"{what} file {path} is truncated: {len(raw)} bytes, shorter than an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{what} file {path} has bad magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{what} file {path} is truncated: expected a {header}-byte header, got {len(raw)} bytes")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataError(f"{what} file {path} is truncated: expected {expected} bytes, got {len(raw)}")
    if len(raw) > expected:
        raise DataError(f"{what} file {path} has extra data: expected {expected} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(directory: str, stem: str, what: str) -> str:
    """Returns ``directory/stem`` or ``directory/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise DataError(f"{what} file {os.path.join(directory, stem)}[.gz] not found")


def _limit(n: int | None, name: str, available: int, what: str) -> int:
    if n is None:
        return available
    n = _check_positive_int(name, n)
    if n > available:
        raise DataError(f"{what}: {name}={n} exceeds the {available} examples available")
    return n


def fashion_mnist(path: str | None = None, limit_train: int | None = None,
                  limit_test: int | None = None, flatten: bool = False) -> Dataset:
    """Fashion-MNIST (70,000 28×28 grey images, 10 classes) from its four standard IDX files.

    The directory is ``path``, else ``$RATE_TUNING_FASHION_MNIST``, else where the Debian package
    ``dataset-fashion-mnist`` installs it (:data:`FASHION_MNIST_DIR`). Each file may be gzipped
    (``.gz``) or not. Pixels are scaled to ``[0, 1]``, without standardisation.

    Args:
      path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
      limit_train: keep only the first ``limit_train`` training examples.
      limit_test: keep only the first ``limit_test`` test examples.
      flatten: return inputs as ``(N, 784)`` vectors instead of ``(N, 28, 28, 1)`` images.

    Returns:
      A :class:`Dataset`.
    """
    what = "Fashion-MNIST"
    directory = path or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
    if not os.path.isdir(directory):
        raise DataError(f"{what} directory {directory} not found (pass path=, set ${FASHION_MNIST_ENV}, "
                        "or install the Debian package dataset-fashion-mnist)")
    splits = []
    for prefix, limit_name, limit in (("train", "limit_train", limit_train), ("t10k", "limit_test", limit_test)):
        images_path = _find_file(directory, f"{prefix}-images-idx3-ubyte", what)
        labels_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte", what)
        images = read_idx(images_path, IDX_IMAGES_MAGIC, what)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC, what)
        if len(images) != len(labels):
            raise DataError(f"{what} files {images_path} and {labels_path} disagree: "
                            f"{len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() >= 10:
            raise DataError(f"{what} file {labels_path} has label {int(labels.max())} out of range [0, 10)")
        n = _limit(limit, limit_name, len(images), what)
        x = images[:n, :, :, None].astype(np.float32)
        x /= 255.0
        splits += [x, labels[:n].astype(np.int32)]
    data = Dataset(*splits, num_classes=10, name="fashion_mnist")
    return data.flattened() if flatten else data


_CIFAR_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers, so a data file cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch: a pickled dict with ``b'data'`` and ``b'labels'``.

    ``b'data'`` is ``N × 3072`` uint8, each row the R, G and B planes of a 32×32 image in turn.

    Args:
      path: path of the batch file (e.g. ``data_batch_1`` or ``test_batch``).

    Returns:
      ``(x, y)``: uint8 images ``(N, 32, 32, 3)`` and int32 labels ``(N,)``.
    """
    what = "CIFAR-10"
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{what} file {path} not found") from None
    except Exception as e:  # unpickling corrupt data can raise almost any exception type
        raise DataError(f"{what} file {path} could not be unpickled: {type(e).__name__}: {e}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{what} file {path} is not a dict with keys b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{what} file {path} has b'data' of shape {data.shape} and dtype {data.dtype}, "
                        "expected (N, 3072) uint8")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what} file {path} has {labels.size} labels of dtype {labels.dtype} "
                        f"for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise DataError(f"{what} file {path} has labels out of range [0, 10)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def cifar10(path: str | None = None, limit_train: int | None = None,
            limit_test: int | None = None) -> Dataset:
    """CIFAR-10 (60,000 32×32 colour images, 10 classes) from its standard python batches.

    Security: the batches are pickles; they are read with an unpickler that only builds numpy arrays.

    Args:
      path: directory holding ``data_batch_1`` … ``data_batch_5`` and ``test_batch``; defaults to
        ``$RATE_TUNING_CIFAR10``.
      limit_train: keep only the first ``limit_train`` training examples.
      limit_test: keep only the first ``limit_test`` test examples.

    Returns:
      A :class:`Dataset` with inputs ``(N, 32, 32, 3)`` scaled to ``[0, 1]``.
    """
    what = "CIFAR-10"
    directory = path or os.environ.get(CIFAR10_ENV)
    if not directory:
        raise DataError(f"{what}: no directory given (pass path= or set ${CIFAR10_ENV})")
    if not os.path.isdir(directory):
        raise DataError(f"{what} directory {directory} not found")
    train = [read_cifar_batch(os.path.join(directory, f"data_batch_{i}")) for i in range(1, 6)]
    test = read_cifar_batch(os.path.join(directory, "test_batch"))
    splits = []
    for (images, labels), limit_name, limit in (
            ((np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
             "limit_train", limit_train),
            (test, "limit_test", limit_test)):
        n = _limit(limit, limit_name, len(images), what)
        x = images[:n].astype(np.float32)
        x /= 255.0
        splits += [x, labels[:n]]
    return Dataset(*splits, num_classes=10, name="cifar10")


LOADERS = {
    "synthetic": synthetic,
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
}
"""Dataset loaders by name, as used by :func:`load`."""


def load(name: str, **kwargs) -> Dataset:
    """Loads a dataset by name.

    Args:
      name: one of ``'synthetic'``, ``'digits'``, ``'fashion_mnist'``, ``'cifar10'``
        (``'-'`` is accepted for ``'_'``).
      **kwargs: passed to the loader.

    Returns:
      A :class:`Dataset`.
    """
    loader = LOADERS.get(name.replace("-", "_").lower())
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(LOADERS)}")
    return loader(**kwargs)


# ------------------------------------------------------------------------------------------------
# Batching. Batches are drawn without replacement from a permutation that depends only on
# (seed, epoch); the last incomplete batch of each epoch is dropped, because BatchNorm statistics need
# full batches (and a fixed batch shape avoids recompiling the jitted step).


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of full batches in an epoch of ``n`` examples (the last incomplete batch is dropped).

    Args:
      n: number of examples.
      batch_size: examples per batch, an integer in ``[1, n]``.

    Returns:
      ``n // batch_size``.
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the number of examples ({n})")
    return n // batch_size


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in epoch ``epoch``: ``np.random.default_rng([seed, epoch]).permutation(n)``.

    Args:
      n: number of examples.
      seed: non-negative integer seed.
      epoch: non-negative epoch number.

    Returns:
      A read-only int array, a permutation of ``range(n)``.
    """
    seed = _check_positive_int("seed", seed, minimum=0)
    epoch = _check_positive_int("epoch", epoch, minimum=0)
    return _permutation(int(n), seed, epoch)


def _check_pair(x: np.ndarray, y: np.ndarray) -> int:
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    return len(x)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
            start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields the full batches of one epoch in a deterministic order (the last incomplete one is dropped).

    Args:
      x: inputs, examples on the first axis.
      y: labels, same length as ``x``.
      batch_size: examples per batch, in ``[1, len(x)]``.
      seed: non-negative integer seed.
      epoch: epoch number; with ``seed`` it fixes the permutation.
      start: index of the first batch to yield, to resume an epoch part-way.

    Returns:
      An iterator of ``(x_batch, y_batch)``; batch ``b`` equals
      ``batch_at(x, y, batch_size, seed, epoch * steps_per_epoch(len(x), batch_size) + b)``.
    """
    n = _check_pair(x, y)
    nb = steps_per_epoch(n, batch_size)
    start = _check_positive_int("start", start, minimum=0)
    perm = epoch_permutation(n, seed, epoch)
    for b in range(start, nb):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        yield x[idx], y[idx]


def batch_at(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
             step: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch used at global step ``step``, so that a training loop is a pure function of the step.

    Step ``step`` is batch ``step % steps_per_epoch`` of epoch ``step // steps_per_epoch``, in the
    order of :func:`batches`.

    Args:
      x: inputs, examples on the first axis.
      y: labels, same length as ``x``.
      batch_size: examples per batch, in ``[1, len(x)]``.
      seed: non-negative integer seed.
      step: non-negative global step number.

    Returns:
      ``(x_batch, y_batch)``.
    """
    n = _check_pair(x, y)
    nb = steps_per_epoch(n, batch_size)
    step = _check_positive_int("step", step, minimum=0)
    epoch, b = divmod(step, nb)
    idx = epoch_permutation(n, seed, epoch)[b * batch_size:(b + 1) * batch_size]
    return x[idx], y[idx]


def full_batch(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole dataset as one batch, for full-batch gradient descent.

    Args:
      x: inputs.
      y: labels, same length as ``x``.

    Returns:
      ``(x, y)`` unchanged.
    """
    _check_pair(x, y)
    return x, y
