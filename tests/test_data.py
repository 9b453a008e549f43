"""Tests of rate_tuning.data: loaders, file-format checks and deterministic batching."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest

from rate_tuning import data
from rate_tuning.data import DataError

# ------------------------------------------------------------------------------------------------
# synthetic and digits


def test_synthetic_shapes_and_determinism():
    a = data.synthetic(100, 40, 7, 3, seed=5)
    b = data.synthetic(100, 40, 7, 3, seed=5)
    c = data.synthetic(100, 40, 7, 3, seed=6)
    assert a.x_train.shape == (100, 7) and a.x_test.shape == (40, 7)
    assert a.input_shape == (7,) and a.num_classes == 3 and a.name == "synthetic"
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert set(np.unique(a.y_train)) <= {0, 1, 2}
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.x_train, c.x_train)
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.std(0), 1, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(n_train=0), dict(num_classes=1), dict(dim=2.5), dict(noise=-1.0)])
def test_synthetic_rejects_bad_arguments(kwargs):
    args = dict(n_train=10, n_test=5, dim=3, num_classes=2, seed=0) | kwargs
    with pytest.raises(ValueError):
        data.synthetic(**args)


def test_digits_shapes_normalisation_and_split():
    a = data.digits(seed=0)
    assert a.x_train.shape == (1437, 8, 8, 1) and a.x_test.shape == (360, 8, 8, 1)
    assert a.input_shape == (8, 8, 1) and a.num_classes == 10
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert abs(a.x_train.mean()) < 1e-5 and abs(a.x_train.std() - 1) < 1e-5
    b = data.digits(seed=0)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    c = data.digits(seed=1)
    assert not np.array_equal(a.y_test, c.y_test)
    flat = data.digits(seed=0, flatten=True)
    assert flat.x_train.shape == (1437, 64)
    np.testing.assert_array_equal(flat.x_train, a.x_train.reshape(1437, 64))
    assert sorted(np.unique(np.concatenate([a.y_train, a.y_test]))) == list(range(10))


def test_load_dispatch_and_unknown_name():
    a = data.load("synthetic", n_train=8, n_test=4, dim=2, num_classes=2, seed=0)
    assert a.x_train.shape == (8, 2)
    with pytest.raises(DataError, match="unknown dataset 'mnist'; known datasets: synthetic, digits"):
        data.load("mnist")


def test_standardize_uses_train_statistics_per_channel():
    rng = np.random.default_rng(0)
    x_train = rng.normal([1.0, -2.0, 5.0], [1.0, 3.0, 0.5], size=(200, 4, 4, 3))
    x_test = x_train[:10] + 100
    s_train, s_test = data.standardize(x_train, x_test)
    np.testing.assert_allclose(s_train.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(s_train.std((0, 1, 2)), 1, atol=1e-5)
    np.testing.assert_allclose(s_test - s_train[:10],
                               np.broadcast_to(100 / x_train.std((0, 1, 2)), s_test.shape), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST format)


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, payload: bytes):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_fashion(directory, gz: bool, n_train=12, n_test=5):
    """Writes a tiny Fashion-MNIST-format dataset; returns (arrays, {stem: path})."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    paths = {}
    for stem, array in arrays.items():
        paths[stem] = directory / (stem + (".gz" if gz else ""))
        _write(paths[stem], _idx_bytes(array))
    return arrays, paths


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays, _ = _write_fashion(tmp_path, gz)
    d = data.fashion_mnist(str(tmp_path))
    assert d.x_train.shape == (12, 28, 28, 1) and d.x_test.shape == (5, 28, 28, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    np.testing.assert_array_equal(d.x_train[..., 0] * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1
    limited = data.fashion_mnist(str(tmp_path), limit_train=3, limit_test=2, flatten=True)
    assert limited.x_train.shape == (3, 784) and limited.x_test.shape == (2, 784)
    np.testing.assert_array_equal(limited.y_train, d.y_train[:3])


def test_fashion_mnist_env_var_overrides_default(tmp_path, monkeypatch):
    _write_fashion(tmp_path, gz=True)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    assert data.load("fashion-mnist").x_train.shape == (12, 28, 28, 1)


def _corrupt_missing(paths, arrays):
    os.remove(paths["t10k-labels-idx1-ubyte"])
    return "t10k-labels-idx1-ubyte", "not found"


def _corrupt_magic(paths, arrays):
    _write(paths["train-images-idx3-ubyte"], _idx_bytes(arrays["train-images-idx3-ubyte"], magic=0x0802))
    return "train-images-idx3-ubyte", "bad magic number 0x00000802, expected 0x00000803"


def _corrupt_truncated(paths, arrays):
    _write(paths["train-images-idx3-ubyte"], _idx_bytes(arrays["train-images-idx3-ubyte"])[:1000])
    return "train-images-idx3-ubyte", f"is truncated: expected {16 + 12 * 784} bytes, got 1000"


def _corrupt_extra(paths, arrays):
    _write(paths["t10k-labels-idx1-ubyte"], _idx_bytes(arrays["t10k-labels-idx1-ubyte"]) + b"\0")
    return "t10k-labels-idx1-ubyte", "has extra data: expected 13 bytes, got 14"


def _corrupt_count(paths, arrays):
    _write(paths["train-labels-idx1-ubyte"], _idx_bytes(arrays["train-labels-idx1-ubyte"][:11]))
    return "train-labels-idx1-ubyte", "12 images but 11 labels"


def _corrupt_label(paths, arrays):
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[2] = 10
    _write(paths["t10k-labels-idx1-ubyte"], _idx_bytes(labels))
    return "t10k-labels-idx1-ubyte", "label 10 out of range"


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("corrupt", [_corrupt_missing, _corrupt_magic, _corrupt_truncated,
                                     _corrupt_extra, _corrupt_count, _corrupt_label])
def test_idx_corruption_raises_one_line_data_error(tmp_path, gz, corrupt):
    arrays, paths = _write_fashion(tmp_path, gz)
    stem, fragment = corrupt(paths, arrays)
    with pytest.raises(DataError) as info:
        data.fashion_mnist(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / stem) in message and fragment in message, message


def test_corrupt_gzip_stream_raises_data_error(tmp_path):
    _, paths = _write_fashion(tmp_path, gz=True)
    raw = paths["train-images-idx3-ubyte"].read_bytes()
    paths["train-images-idx3-ubyte"].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz could not be read"):
        data.fashion_mnist(str(tmp_path))


def test_fashion_mnist_missing_directory(tmp_path):
    with pytest.raises(DataError, match="directory .*nowhere not found"):
        data.fashion_mnist(str(tmp_path / "nowhere"))


def _real_fashion_dir():
    return os.environ.get(data.FASHION_MNIST_ENV) or data.FASHION_MNIST_DIR


@pytest.mark.skipif(not os.path.isdir(_real_fashion_dir()),
                    reason=f"Fashion-MNIST not found at {_real_fashion_dir()} "
                           "(apt-get install dataset-fashion-mnist, or set RATE_TUNING_FASHION_MNIST)")
def test_fashion_mnist_real_files():
    d = data.fashion_mnist()
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
    assert d.y_train.shape == (60000,) and d.y_test.shape == (10000,)
    assert d.x_train.dtype == np.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert np.array_equal(np.bincount(d.y_train), np.full(10, 6000))
    assert np.array_equal(np.bincount(d.y_test), np.full(10, 1000))


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python batches


def _write_cifar(directory, n=4):
    """Writes fake CIFAR-10 batches; image i has R = i, G = 100 + i, B = 200 + i, except one marked pixel."""
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        planes = np.zeros((n, 3, 32, 32), np.uint8)
        for i in range(n):
            planes[i] = (np.arange(3) * 100 + i)[:, None, None]
        planes[0, 1, 5, 7] = 250  # green channel, row 5, column 7 of the first image
        labels = [(k + i) % 10 for i in range(n)]
        batch = {b"batch_label": name.encode(), b"data": planes.reshape(n, 3072), b"labels": labels,
                 b"filenames": [b"x.png"] * n}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = labels
    return batches


def test_cifar10_round_trip_channel_major(tmp_path):
    labels = _write_cifar(tmp_path)
    d = data.load("cifar10", path=str(tmp_path))
    assert d.x_train.shape == (20, 32, 32, 3) and d.x_test.shape == (4, 32, 32, 3)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    np.testing.assert_array_equal(d.y_test, labels["test_batch"])
    np.testing.assert_array_equal(d.y_train[4:8], labels["data_batch_2"])
    np.testing.assert_allclose(d.x_test[0, 5, 7] * 255, [0, 250, 200], atol=1e-4)
    np.testing.assert_allclose(d.x_test[3, 0, 0] * 255, [3, 103, 203], atol=1e-4)
    np.testing.assert_allclose(d.x_train[0, 5, 7] * 255, [0, 250, 200], atol=1e-4)
    assert data.cifar10(str(tmp_path), limit_train=6).x_train.shape == (6, 32, 32, 3)


@pytest.mark.parametrize("payload, fragment", [
    (b"not a pickle", "could not be unpickled"),
    (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}), "expected (N, 3072) uint8"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "1 labels"),
    (pickle.dumps([1, 2]), "not a dict"),
    (pickle.dumps(os.system), "is not allowed"),
])
def test_cifar10_corrupt_batch_raises_data_error(tmp_path, payload, fragment):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError) as info:
        data.cifar10(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "data_batch_3") in message and fragment in message, message


def test_cifar10_missing_file(tmp_path):
    _write_cifar(tmp_path)
    os.remove(tmp_path / "test_batch")
    with pytest.raises(DataError, match="test_batch not found"):
        data.cifar10(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# batching


def _toy(n=23):
    return np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n, dtype=np.int32)


def test_batches_deterministic_permutation_drop_last():
    x, y = _toy()
    epoch0 = list(data.batches(x, y, 5, seed=3, epoch=0))
    assert len(epoch0) == 4 == data.steps_per_epoch(23, 5)
    assert all(xb.shape == (5, 2) and yb.shape == (5,) for xb, yb in epoch0)
    seen = np.concatenate([yb for _, yb in epoch0])
    assert len(set(seen)) == 20  # no repeats; the 3 left over are dropped
    for xb, yb in epoch0:
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)
    again = list(data.batches(x, y, 5, seed=3, epoch=0))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(epoch0, again))
    epoch1 = np.concatenate([yb for _, yb in data.batches(x, y, 5, seed=3, epoch=1)])
    assert not np.array_equal(seen, epoch1)
    np.testing.assert_array_equal(np.sort(data.epoch_permutation(23, 3, 1)), np.arange(23))
    other_seed = np.concatenate([yb for _, yb in data.batches(x, y, 5, seed=4, epoch=0)])
    assert not np.array_equal(seen, other_seed)


def test_batch_at_matches_iteration_and_resumption():
    x, y = _toy()
    stream = [yb for epoch in range(3) for _, yb in data.batches(x, y, 5, seed=7, epoch=epoch)]
    for step, yb in enumerate(stream):
        xb_at, yb_at = data.batch_at(x, y, 5, seed=7, step=step)
        np.testing.assert_array_equal(yb_at, yb)
        np.testing.assert_array_equal(xb_at[:, 1], 2 * yb + 1)
    resumed = [yb for _, yb in data.batches(x, y, 5, seed=7, epoch=1, start=2)]
    assert len(resumed) == 2
    for got, want in zip(resumed, stream[6:8]):
        np.testing.assert_array_equal(got, want)


def test_full_batch():
    x, y = _toy()
    xb, yb = data.full_batch(x, y)
    assert xb is x and yb is y
    with pytest.raises(ValueError, match="x has 23 examples but y has 22"):
        data.full_batch(x, y[:-1])


@pytest.mark.parametrize("batch_size, fragment", [
    (0, "batch_size must be an integer >= 1"),
    (-3, "batch_size must be an integer >= 1"),
    (2.0, "batch_size must be an integer >= 1"),
    (True, "batch_size must be an integer >= 1"),
    (24, "batch_size=24 exceeds the number of examples (23)"),
])
def test_bad_batch_size(batch_size, fragment):
    x, y = _toy()
    with pytest.raises(ValueError) as info:
        next(data.batches(x, y, batch_size, seed=0, epoch=0))
    assert fragment in str(info.value)
    with pytest.raises(ValueError):
        data.batch_at(x, y, batch_size, seed=0, step=0)
