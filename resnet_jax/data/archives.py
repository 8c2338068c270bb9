"""Readers for the official CIFAR and MNIST-format archives, numpy only (no TensorFlow).

Every reader returns uint8 NHWC images and int32 labels, and raises ValueError naming the file
when the file is truncated, corrupt, or holds labels outside [0, num_classes).
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

Split = tuple[np.ndarray, np.ndarray]
_CIFAR_PIXELS = 32 * 32 * 3

# Errors that a damaged gzip/tar stream can raise; all are reported as ValueError with the path.
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches that refuses anything but numpy arrays.

    The official batches are pickles; restricting the globals keeps a tampered file from
    executing code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _check_labels(labels: np.ndarray, num_classes: int, path: Path, member: str = "") -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        where = f"{path}:{member}" if member else str(path)
        raise ValueError(
            f"{where}: label out of range [0, {num_classes}): "
            f"min {int(labels.min())}, max {int(labels.max())}"
        )


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    # CIFAR stores each image as 1024 R, then 1024 G, then 1024 B values, row-major.
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _read_tar_members(path: Path) -> dict[str, bytes]:
    """All regular files of a .tar.gz, keyed by base name (the top folder name is ignored)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            return {
                Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers()
                if m.isfile()
            }
    except _STREAM_ERRORS as e:
        raise ValueError(f"{path}: truncated or corrupt archive ({type(e).__name__}: {e})") from e


def _member(members: dict[str, bytes], name: str, path: Path) -> bytes:
    if name not in members:
        raise ValueError(f"{path}: archive has no member {name!r} (found {sorted(members)})")
    return members[name]


def _cifar_binary_records(
    data: bytes, n_label_bytes: int, label_byte: int, path: Path, member: str
) -> Split:
    record = n_label_bytes + _CIFAR_PIXELS
    if len(data) == 0 or len(data) % record:
        raise ValueError(
            f"{path}:{member}: size {len(data)} is not a multiple of the {record}-byte record"
        )
    arr = np.frombuffer(data, np.uint8).reshape(-1, record)
    return _chw_to_hwc(arr[:, n_label_bytes:]), arr[:, label_byte].astype(np.int32)


def _concat(parts: list[Split]) -> Split:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar_binary(path: str | Path, num_classes: int) -> tuple[Split, Split, list[str] | None]:
    """Read `cifar-10-binary.tar.gz` or `cifar-100-binary.tar.gz` into (train, test, class names).

    CIFAR-100 uses the fine (100-class) label.
    """
    path = Path(path)
    members = _read_tar_members(path)
    if num_classes == 10:
        train_names = [f"data_batch_{i}.bin" for i in range(1, 6)]
        test_names, n_label, label_byte = ["test_batch.bin"], 1, 0
        meta_name = "batches.meta.txt"
    else:
        train_names, test_names, n_label, label_byte = ["train.bin"], ["test.bin"], 2, 1
        meta_name = "fine_label_names.txt"
    splits = []
    for names in (train_names, test_names):
        parts = []
        for name in names:
            images, labels = _cifar_binary_records(
                _member(members, name, path), n_label, label_byte, path, name
            )
            _check_labels(labels, num_classes, path, name)
            parts.append((images, labels))
        splits.append(_concat(parts))
    class_names = None
    if meta_name in members:
        lines = [s.strip() for s in members[meta_name].decode().splitlines() if s.strip()]
        class_names = lines if len(lines) == num_classes else None
    return splits[0], splits[1], class_names


def _unpickle(data: bytes, path: Path, member: str) -> dict:
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a damaged or foreign file
        raise ValueError(f"{path}:{member}: cannot unpickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{member}: expected a dict, got {type(obj).__name__}")
    return obj


def _python_batch(members: dict[str, bytes], name: str, label_key: bytes, path: Path) -> Split:
    batch = _unpickle(_member(members, name, path), path, name)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}:{name}: missing key b'data' or {label_key!r}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}:{name}: data shape {data.shape} / labels {labels.shape} do not match "
            f"[N, {_CIFAR_PIXELS}] / [N]"
        )
    return _chw_to_hwc(data), labels.astype(np.int32)


def read_cifar_python(path: str | Path, num_classes: int) -> tuple[Split, Split, list[str] | None]:
    """Read `cifar-10-python.tar.gz` or `cifar-100-python.tar.gz` into (train, test, class names).

    CIFAR-100 uses the fine (100-class) label.
    """
    path = Path(path)
    members = _read_tar_members(path)
    if num_classes == 10:
        train_names = [f"data_batch_{i}" for i in range(1, 6)]
        test_names, label_key = ["test_batch"], b"labels"
        meta_name, names_key = "batches.meta", b"label_names"
    else:
        train_names, test_names, label_key = ["train"], ["test"], b"fine_labels"
        meta_name, names_key = "meta", b"fine_label_names"
    splits = []
    for names in (train_names, test_names):
        parts = [_python_batch(members, n, label_key, path) for n in names]
        for n, (_, labels) in zip(names, parts, strict=True):
            _check_labels(labels, num_classes, path, n)
        splits.append(_concat(parts))
    class_names = None
    if meta_name in members:
        meta = _unpickle(members[meta_name], path, meta_name)
        raw = meta.get(names_key)
        if raw is not None and len(raw) == num_classes:
            class_names = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
    return splits[0], splits[1], class_names


def read_idx(path: str | Path) -> np.ndarray:
    """Read one gzipped MNIST idx file (`*-idx3-ubyte.gz` images or `*-idx1-ubyte.gz` labels)."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except _STREAM_ERRORS as e:
        raise ValueError(f"{path}: truncated or corrupt gzip ({type(e).__name__}: {e})") from e
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(x) for x in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: truncated or corrupt idx file: {len(data) - header} data bytes, "
            f"header shape {shape} needs {expected}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_mnist_dir(paths: list[Path], num_classes: int = 10) -> tuple[Split, Split]:
    """Read the four MNIST-format files (train images, train labels, test images, test labels)."""
    out = []
    for img_path, lbl_path in ((paths[0], paths[1]), (paths[2], paths[3])):
        images = read_idx(img_path)
        labels = read_idx(lbl_path).astype(np.int32)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{img_path} / {lbl_path}: shapes {images.shape} and {labels.shape} do not match"
            )
        _check_labels(labels, num_classes, lbl_path)
        out.append((images[..., None].copy(), labels))
    return out[0], out[1]


def read_archive(paths: list[Path], num_classes: int) -> tuple[Split, Split, list[str] | None]:
    """Dispatch on the archive file name(s) found by `catalog.find_archive`."""
    name = paths[0].name
    if name.endswith("-binary.tar.gz"):
        return read_cifar_binary(paths[0], num_classes)
    if name.endswith("-python.tar.gz"):
        return read_cifar_python(paths[0], num_classes)
    train, test = read_mnist_dir(paths, num_classes)
    return train, test, None
