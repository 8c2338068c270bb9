"""Data sources: official archives written in the test, TFDS (mocked), bundled sample, errors."""

from __future__ import annotations

import gzip
import io
import pickle
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_jax.data import (
    DatasetNotFoundError,
    default_data_config,
    load_dataset,
    load_raw,
    split_indices,
    tfds_source,
)
from resnet_jax.data.catalog import FASHION_MNIST_SYSTEM_DIR

PER_BATCH = 4  # records per CIFAR batch file: 5 train files -> 20 train, 4 test


def _images(rng: np.random.Generator, n: int, shape=(32, 32, 3)) -> np.ndarray:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def _chw_flat(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _cifar10_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    train = [(_images(rng, PER_BATCH), rng.integers(0, 10, PER_BATCH)) for _ in range(5)]
    test = (_images(rng, PER_BATCH), rng.integers(0, 10, PER_BATCH))
    return train, test


def write_cifar10_binary(path: Path, train, test, bad_label: bool = False) -> None:
    """The official layout: cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin, label+3072 B."""

    def records(images, labels):
        labels = np.asarray(labels, np.uint8).copy()
        if bad_label:
            labels[0] = 10
        return np.concatenate([labels[:, None], _chw_flat(images)], axis=1).tobytes()

    members = {
        f"cifar-10-batches-bin/data_batch_{i + 1}.bin": records(*b) for i, b in enumerate(train)
    }
    members["cifar-10-batches-bin/test_batch.bin"] = records(*test)
    members["cifar-10-batches-bin/batches.meta.txt"] = (
        b"\n".join(n.encode() for n in "a b c d e f g h i j".split()) + b"\n\n"
    )
    _write_tar(path, members)


def write_cifar10_python(path: Path, train, test) -> None:
    """Official layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} pickles."""

    def batch(images, labels, name):
        d = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": _chw_flat(images),
            b"filenames": [f"img{i}.png".encode() for i in range(len(labels))],
        }
        return pickle.dumps(d, protocol=2)

    members = {
        f"cifar-10-batches-py/data_batch_{i + 1}": batch(*b, f"training batch {i + 1} of 5")
        for i, b in enumerate(train)
    }
    members["cifar-10-batches-py/test_batch"] = batch(*test, "testing batch 1 of 1")
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {
            b"label_names": [n.encode() for n in "a b c d e f g h i j".split()],
            b"num_cases_per_batch": PER_BATCH,
            b"num_vis": 3072,
        },
        protocol=2,
    )
    _write_tar(path, members)


def _config(name: str, data_dir, **kw):
    c = default_data_config()
    c.name, c.data_dir = name, str(data_dir)
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.mark.parametrize("fmt", ["binary", "python"])
def test_cifar10_archive_roundtrip(tmp_path, fmt):
    train, test = _cifar10_arrays()
    writer = write_cifar10_binary if fmt == "binary" else write_cifar10_python
    writer(tmp_path / f"cifar-10-{fmt}.tar.gz", train, test)

    (x, y), (xt, yt), names, source = load_raw("cifar10", "auto", str(tmp_path))
    assert source == "archive"
    np.testing.assert_array_equal(x, np.concatenate([b[0] for b in train]))
    np.testing.assert_array_equal(y, np.concatenate([b[1] for b in train]))
    np.testing.assert_array_equal(xt, test[0])
    np.testing.assert_array_equal(yt, test[1])
    assert x.dtype == np.uint8 and y.dtype == np.int32 and x.shape == (20, 32, 32, 3)
    assert names == tuple("abcdefghij")

    ds = load_dataset(_config("cifar10", tmp_path, validation_size=4, source="archive"))
    tr_idx, val_idx = split_indices(20, 4, 0)
    np.testing.assert_array_equal(ds.train_images, x[tr_idx])
    np.testing.assert_array_equal(ds.validation_labels, y[val_idx])
    assert (ds.spec.num_train, ds.spec.num_validation, ds.spec.num_test) == (16, 4, PER_BATCH)


def test_archive_found_through_resnet_jax_data(tmp_path, monkeypatch):
    train, test = _cifar10_arrays(seed=3)
    (tmp_path / "data").mkdir()
    write_cifar10_binary(tmp_path / "data" / "cifar-10-binary.tar.gz", train, test)
    monkeypatch.setenv("RESNET_JAX_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/resnet_jax to fall back on
    config = default_data_config()  # data_dir None: the variable decides
    config.validation_size = 4
    ds = load_dataset(config)
    assert ds.spec.source == "archive"
    np.testing.assert_array_equal(ds.test_images, test[0])
    assert ds.spec.num_train + ds.spec.num_validation == 20


def _idx_gz(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _write_mnist(d: Path, rng, n_train=12, n_test=5) -> tuple:
    d.mkdir(parents=True, exist_ok=True)
    xtr, xte = _images(rng, n_train, (28, 28)), _images(rng, n_test, (28, 28))
    ytr, yte = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    for stem, arr in (
        ("train-images-idx3", xtr),
        ("train-labels-idx1", ytr),
        ("t10k-images-idx3", xte),
        ("t10k-labels-idx1", yte),
    ):
        _idx_gz(d / f"{stem}-ubyte.gz", arr)
    return xtr, ytr, xte, yte


def test_mnist_idx_roundtrip(tmp_path):
    xtr, ytr, xte, yte = _write_mnist(tmp_path / "mnist", np.random.default_rng(1))
    (x, y), (xt, yt), _, source = load_raw("mnist", "archive", str(tmp_path))
    assert source == "archive" and x.shape == (12, 28, 28, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], xtr)
    np.testing.assert_array_equal(y, ytr)
    np.testing.assert_array_equal(xt[..., 0], xte)
    np.testing.assert_array_equal(yt, yte)


def test_truncated_archive_names_file(tmp_path):
    train, test = _cifar10_arrays()
    path = tmp_path / "cifar-10-binary.tar.gz"
    write_cifar10_binary(path, train, test)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cifar-10-binary.tar.gz"):
        load_raw("cifar10", "archive", str(tmp_path))


def test_bad_label_names_file(tmp_path):
    train, test = _cifar10_arrays()
    write_cifar10_binary(tmp_path / "cifar-10-binary.tar.gz", train, test, bad_label=True)
    with pytest.raises(ValueError, match=r"cifar-10-binary\.tar\.gz.*out of range"):
        load_raw("cifar10", "archive", str(tmp_path))


def test_truncated_idx_names_file(tmp_path):
    _write_mnist(tmp_path / "mnist", np.random.default_rng(2))
    p = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-10]))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_raw("mnist", "archive", str(tmp_path))


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"known datasets:.*cifar10.*fashion_mnist_sample"):
        load_dataset(_config("cifar11", "/nonexistent"))


@pytest.mark.parametrize("key,value", [("source", "web"), ("normalization", "zca")])
def test_bad_config_value(key, value):
    with pytest.raises(ValueError, match=rf"{key}='{value}'.*choose one of"):
        load_dataset(_config("cifar10", "/nonexistent", **{key: value}))


def test_missing_dataset_offline_fails_fast(tmp_path, monkeypatch):
    # Without TensorFlow (this test env) the TFDS path cannot prepare: immediate error.
    t0 = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(_config("cifar10", tmp_path))
    msg = str(e.value)
    assert "cifar-10-binary.tar.gz" in msg and str(tmp_path) in msg and "[prepare]" in msg
    # With TensorFlow but no network: the connectivity probe fails at once, no TFDS retries.
    monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: True)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DatasetNotFoundError, match=r"unreachable.*cifar-10-python\.tar\.gz"):
        load_dataset(_config("cifar10", tmp_path, source="tfds"))
    assert time.monotonic() - t0 < 10


def test_tfds_path_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset(_config("cifar10", tmp_path, source="tfds", validation_size=2))
    assert ds.spec.source == "tfds"
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.validation_images.shape == (2, 32, 32, 3) and ds.test_images.shape == (12, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
    assert ds.train_images.std() > 0  # random mock pixels, not an empty array


def test_tfds_grayscale_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = load_dataset(_config("mnist", tmp_path, source="tfds", validation_size=1))
    assert ds.train_images.shape == (5, 28, 28, 1)


def test_bundled_sample():
    c = default_data_config()
    c.name, c.validation_size = "fashion_mnist_sample", 0
    ds = load_dataset(c)
    assert ds.spec.source == "bundled" and ds.spec.num_classes == 10
    assert ds.train_images.shape == (5000, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (1000, 28, 28, 1) and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), [500] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10), [100] * 10)
    assert ds.train_images.max() > 200  # real images, not zeros
    asset = Path(__file__).parents[1] / "resnet_jax/data/assets/fashion_mnist_sample.npz"
    assert asset.stat().st_size < 5 * 1024 * 1024


@pytest.mark.skipif(
    not Path(FASHION_MNIST_SYSTEM_DIR).is_dir(), reason="Debian dataset-fashion-mnist not installed"
)
def test_fashion_mnist_from_system_dir(tmp_path):
    (x, y), (xt, yt), names, source = load_raw("fashion_mnist", "auto", str(tmp_path))
    assert source == "archive" and x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert names[0] == "T-shirt/top" and np.bincount(y).tolist() == [6000] * 10


@pytest.mark.parametrize("fmt", ["binary", "python"])
def test_cifar100_archive_uses_fine_labels(tmp_path, fmt):
    rng = np.random.default_rng(3)
    (xtr, xte) = _images(rng, 6), _images(rng, 3)
    fine = [rng.integers(0, 100, 6), rng.integers(0, 100, 3)]
    coarse = [f // 5 for f in fine]
    if fmt == "binary":

        def rec(x, c, f):
            return np.concatenate(
                [np.stack([c, f], 1).astype(np.uint8), _chw_flat(x)], axis=1
            ).tobytes()

        members = {
            "cifar-100-binary/train.bin": rec(xtr, coarse[0], fine[0]),
            "cifar-100-binary/test.bin": rec(xte, coarse[1], fine[1]),
        }
    else:

        def rec(x, c, f):
            return pickle.dumps(
                {
                    b"data": _chw_flat(x),
                    b"fine_labels": [int(v) for v in f],
                    b"coarse_labels": [int(v) for v in c],
                },
                protocol=2,
            )

        members = {
            "cifar-100-python/train": rec(xtr, coarse[0], fine[0]),
            "cifar-100-python/test": rec(xte, coarse[1], fine[1]),
        }
    _write_tar(tmp_path / f"cifar-100-{fmt}.tar.gz", members)
    (x, y), (xt, yt), _, _ = load_raw("cifar100", "archive", str(tmp_path))
    np.testing.assert_array_equal(x, xtr)
    np.testing.assert_array_equal(y, fine[0])
    np.testing.assert_array_equal(xt, xte)
    np.testing.assert_array_equal(yt, fine[1])
