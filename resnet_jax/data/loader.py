"""`load_dataset(config.data)`: name + source -> host-side splits, spec and normaliser stats."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from resnet_jax.data.archives import read_archive
from resnet_jax.data.bundled import load_bundled
from resnet_jax.data.catalog import (
    BUNDLED,
    DatasetInfo,
    DatasetNotFoundError,
    find_archive,
    get_info,
    where_to_put,
)
from resnet_jax.data.config import validate_data_config
from resnet_jax.data.preprocess import NormStats, compute_stats
from resnet_jax.data.splits import split_indices
from resnet_jax.data.tfds_source import load_tfds

Split = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Static, hashable metadata the model and trainer need."""

    name: str
    source: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    num_train: int
    num_validation: int
    num_test: int


@dataclasses.dataclass
class Dataset:
    """Host-side splits (uint8 NHWC images, int32 labels), spec and normalisation stats."""

    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    spec: DataSpec
    stats: NormStats


def resolve_source(info: DatasetInfo, source: str, data_dir: str | None) -> str:
    """Which source "auto" means for this dataset, and a check that an explicit one applies."""
    if info.name in BUNDLED:
        if source not in ("auto", "bundled"):
            raise ValueError(f"{info.name!r} is bundled; use source='bundled' or 'auto'")
        return "bundled"
    if source == "bundled":
        raise ValueError(f"source='bundled' only serves {BUNDLED}, not {info.name!r}")
    if source == "auto":
        return "archive" if find_archive(info, data_dir) else "tfds"
    return source


def load_raw(name: str, source: str = "auto", data_dir: str | None = None):
    """Return (train, test, class_names, resolved_source) before any split or normalisation."""
    info = get_info(name)
    resolved = resolve_source(info, source, data_dir)
    names = None
    if resolved == "bundled":
        train, test = load_bundled(name)
    elif resolved == "archive":
        paths = find_archive(info, data_dir)
        if paths is None:
            hint = where_to_put(info, data_dir)
            raise DatasetNotFoundError(f"No archive for {name!r} found. {hint}")
        train, test, names = read_archive(paths, info.num_classes)
    else:
        train, test, names = load_tfds(info, data_dir)
    for split_name, (images, _) in (("train", train), ("test", test)):
        if tuple(images.shape[1:]) != info.image_shape:
            raise ValueError(
                f"{name}/{split_name}: images have shape {images.shape[1:]}, "
                f"expected {info.image_shape}"
            )
    class_names = tuple(names) if names and len(names) == info.num_classes else info.class_names
    return train, test, class_names, resolved


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """Load, split (seeded validation hold-out) and compute normalisation stats on train only."""
    validate_data_config(config)
    (x, y), (x_test, y_test), class_names, resolved = load_raw(
        config.name, config.source, config.data_dir
    )
    train_idx, val_idx = split_indices(len(x), config.validation_size, config.split_seed)
    x_train, y_train = x[train_idx], y[train_idx]
    # Statistics from the training split only: validation and test stay unseen.
    stats = compute_stats(x_train, config.normalization)
    info = get_info(config.name)
    spec = DataSpec(
        name=config.name,
        source=resolved,
        num_classes=info.num_classes,
        image_shape=info.image_shape,
        class_names=class_names,
        num_train=len(train_idx),
        num_validation=len(val_idx),
        num_test=len(x_test),
    )
    return Dataset(
        x_train, y_train, x[val_idx], y[val_idx], x_test, y_test.astype(np.int32), spec, stats
    )
