"""`load_dataset(config.data)`: name + source -> host-side splits, spec and normaliser stats."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from resnet_jax.data.archives import read_archive
from resnet_jax.data.bundled import load_bundled
from resnet_jax.data.catalog import (
    BUNDLED,
    IMAGE_FOLDER,
    DatasetInfo,
    DatasetNotFoundError,
    find_archive,
    get_info,
    where_to_put,
)
from resnet_jax.data.config import validate_data_config
from resnet_jax.data.folder_source import load_folder
from resnet_jax.data.folders import HELD_OUT, TRAIN, looks_like_image_tree
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


def resolve_source(info: DatasetInfo | None, source: str, data_dir: str | None) -> str:
    """Which source "auto" means for this dataset, and a check that an explicit one applies.

    `info` is None for `image_folder`, which only class folders can hold.
    """
    if info is None:
        if source not in ("auto", "folder"):
            raise ValueError(f"{IMAGE_FOLDER!r} is read from class folders; use source='folder'")
        return "folder"
    if info.name in BUNDLED:
        if source not in ("auto", "bundled"):
            raise ValueError(f"{info.name!r} is bundled; use source='bundled' or 'auto'")
        return "bundled"
    if source == "bundled":
        raise ValueError(f"source='bundled' only serves {BUNDLED}, not {info.name!r}")
    if source == "auto":
        if find_archive(info, data_dir):
            return "archive"
        return "folder" if looks_like_image_tree(data_dir) else "tfds"
    return source


def _folder(name: str, data_dir: str | None, cache_dir: str | None, workers: int,
            splits=(TRAIN, HELD_OUT), classes=None, image_shape=None):
    if not data_dir:
        raise ValueError("source='folder' needs config.data.data_dir (a directory or .tar/.tar.gz "
                         "holding train/<class>/* and test/<class>/*)")
    if name != IMAGE_FOLDER and classes is None:
        info = get_info(name)
        if info.name == "imagenet2012":
            raise NotImplementedError(
                "imagenet2012 does not fit on the devices; it is read by the streaming pipeline "
                "(config.data.pipeline='stream' or 'auto', see docs/data.md)"
            )
        classes, image_shape = info.class_names, info.image_shape
    return load_folder(data_dir, dataset=name, splits=splits, classes=classes,
                       image_shape=image_shape, cache_dir=cache_dir, workers=workers or None)


def load_raw(name: str, source: str = "auto", data_dir: str | None = None,
             cache_dir: str | None = None, decode_workers: int = 0):
    """Return (train, test, class_names, resolved_source) before any split or normalisation.

    For `image_folder` the class names are train/'s folders and the image shape is the data's.
    `cache_dir` and `decode_workers` (0: one per CPU) apply to class folders only.
    """
    info = None if name == IMAGE_FOLDER else get_info(name)
    resolved = resolve_source(info, source, data_dir)
    names = None
    if resolved == "folder":
        splits, names, _ = _folder(name, data_dir, cache_dir, decode_workers)
        return splits[TRAIN], splits[HELD_OUT], names, resolved
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
        config.name, config.source, config.data_dir, config.get("cache_dir"),
        config.get("decode_workers", 0)
    )
    train_idx, val_idx = split_indices(len(x), config.validation_size, config.split_seed)
    x_train, y_train = x[train_idx], y[train_idx]
    # Statistics from the training split only: validation and test stay unseen.
    stats = compute_stats(x_train, config.normalization)
    spec = DataSpec(
        name=config.name,
        source=resolved,
        num_classes=len(class_names),
        image_shape=tuple(int(d) for d in x.shape[1:]),
        class_names=tuple(class_names),
        num_train=len(train_idx),
        num_validation=len(val_idx),
        num_test=len(x_test),
    )
    return Dataset(
        x_train, y_train, x[val_idx], y[val_idx], x_test, y_test.astype(np.int32), spec, stats
    )


def load_split(config: ml_collections.ConfigDict, split: str, spec: DataSpec) -> Split:
    """The (images, labels) of one split ("test" or "validation") of a trained run's data.

    Scoring the test split of class folders decodes only test/ (or val/); the validation split
    is carved from train as in training. The data's classes and shape must be the run's `spec`
    (ValueError otherwise), so labels mean what they meant in training.
    """
    validate_data_config(config)
    if split not in ("test", "validation"):
        raise ValueError(f"split {split!r} is not valid; choose 'test' or 'validation'")
    info = None if config.name == IMAGE_FOLDER else get_info(config.name)
    if resolve_source(info, config.source, config.data_dir) == "folder":
        part = HELD_OUT if split == "test" else TRAIN
        splits, names, _ = _folder(config.name, config.data_dir, config.get("cache_dir"),
                                   config.get("decode_workers", 0), (part,), spec.class_names,
                                   spec.image_shape)
        images, labels = splits[part]
    else:
        (images, labels), test, names, _ = load_raw(
            config.name, config.source, config.data_dir, config.get("cache_dir"),
            config.get("decode_workers", 0))
        if split == "test":
            images, labels = test
        if tuple(names) != tuple(spec.class_names) or tuple(images.shape[1:]) != tuple(
                spec.image_shape):
            raise ValueError(
                f"the {config.name} data found now has classes {list(names)} and images "
                f"{tuple(images.shape[1:])}, but the run was trained on classes "
                f"{list(spec.class_names)} and images {tuple(spec.image_shape)}"
            )
    if split == "validation":
        _, val_idx = split_indices(len(images), config.validation_size, config.split_seed)
        images, labels = images[val_idx], labels[val_idx]
    return images, labels.astype(np.int32)
