"""Random-access image records for the streaming pipeline: `records[i] -> (name, image, label)`.

`image` is the file's encoded bytes (class folders, TFDS) or a decoded uint8 [H, W, C] array
(datasets small enough to read whole: archives, the bundled sample). Grain reads these by index,
so any process can fetch any example without reading the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from resnet_jax.data.catalog import DatasetInfo, DatasetNotFoundError
from resnet_jax.data.folders import ImageTree, SplitListing

Record = tuple[str, "bytes | np.ndarray", int]
# TFDS names the labelled held-out split differently per dataset.
TFDS_HELD_OUT = {"imagenet2012": "validation"}


class Records(Protocol):
    """What the pipeline reads: `len`, `records[i] -> (name, image, label)` and a subset."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Record: ...

    def subset(self, indices: Sequence[int]) -> Records: ...


class FolderRecords:
    """Files of one class-folder split (a listing) with their labels, optionally a subset."""

    def __init__(self, tree: ImageTree, listing: SplitListing, labels: np.ndarray,
                 indices: Sequence[int] | None = None):
        self.tree, self.listing = tree, listing
        self.labels = np.asarray(labels, np.int32)  # per file of the listing
        self.indices = np.arange(len(listing.files)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        j = int(self.indices[i])
        file = self.listing.files[j]
        return self.tree.describe(file), self.tree.read_one(file), int(self.labels[j])

    def subset(self, indices: Sequence[int]) -> FolderRecords:
        """The records at `indices` (positions in this one)."""
        return FolderRecords(self.tree, self.listing, self.labels, self.indices[indices])


class ArrayRecords:
    """Decoded uint8 NHWC images held in memory (a dataset read whole), as records."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        self.images, self.labels, self.name = images, np.asarray(labels, np.int32), name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Record:
        return f"{self.name}[{i}]", self.images[i], int(self.labels[i])

    def subset(self, indices: Sequence[int]) -> ArrayRecords:
        """The records at `indices`."""
        return ArrayRecords(self.images[indices], self.labels[indices], self.name)


class TfdsRecords:
    """One split of a prepared TFDS dataset read with `tfds.data_source` (array_record files),
    images left encoded so that the pipeline's workers decode them."""

    def __init__(self, source, name: str, num_classes: int,
                 indices: Sequence[int] | None = None):
        self.source, self.name, self.num_classes = source, name, num_classes
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        j = int(self.indices[i])
        example = self.source[j]
        label = int(example["label"])
        if not 0 <= label < self.num_classes:  # e.g. -1, TFDS's "unlabelled"
            raise ValueError(f"{self.name}[{j}]: label {label} is outside [0, "
                             f"{self.num_classes})")
        return f"{self.name}[{j}]", example["image"], label  # encoded: SkipDecoding

    def subset(self, indices: Sequence[int]) -> TfdsRecords:
        """The records at `indices`."""
        return TfdsRecords(self.source, self.name, self.num_classes, self.indices[indices])


class TfdsSplits(NamedTuple):
    """A prepared TFDS dataset's train and held-out records and what its features declare."""

    train: TfdsRecords
    test: TfdsRecords
    class_names: tuple[str, ...] | None  # the label feature's names, None if it has none
    image_shape: tuple[int | None, ...]  # the image feature's (H, W, C); H, W None if they vary


def tfds_records(info: DatasetInfo, data_dir: str | None) -> TfdsSplits:
    """The train and held-out splits ("validation" for imagenet2012, else "test") of a prepared
    TFDS dataset as records of encoded images, read from array_record without TensorFlow.

    Raises DatasetNotFoundError saying how to prepare it when it is not prepared, is prepared
    only as tfrecord (not randomly accessible), or lacks one of the two splits.
    """
    import tensorflow_datasets as tfds  # deferred: the import costs about a second

    from resnet_jax.data.tfds_source import _prepare

    # No file_format here: TFDS refuses to open a folder prepared in another format than the
    # one asked for, before we could say what to do about it.
    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
        _prepare(builder, info, data_dir)  # raises, naming the ways to get it, if it cannot
    splits = ["train", TFDS_HELD_OUT.get(info.name, "test")]
    missing = [s for s in splits if s not in builder.info.splits]
    if missing:
        raise DatasetNotFoundError(
            f"TFDS dataset {info.tfds_name!r} in {builder.data_dir} has no {missing[0]!r} split "
            f"(it has {sorted(builder.info.splits)}); the streaming pipeline reads "
            f"{splits[0]!r} and {splits[1]!r}. Prepare it with both.")
    try:
        sources = builder.as_data_source(
            split=splits, decoders={"image": tfds.decode.SkipDecoding()})
    except (NotImplementedError, ValueError) as e:  # no random-access format was prepared
        raise DatasetNotFoundError(
            f"TFDS dataset {info.tfds_name!r} in {builder.data_dir} has no array_record files "
            "(was it prepared with file_format='tfrecord'?), and the stream reads by index. "
            "Prepare it again into another data_dir with tfds.builder(name, data_dir=DIR, "
            f"file_format='array_record').download_and_prepare(). ({type(e).__name__}: {e})"
        ) from e
    features = builder.info.features
    names = getattr(features["label"], "names", None)
    train, test = (TfdsRecords(s, f"tfds:{info.tfds_name}/{split}", info.num_classes)
                   for s, split in zip(sources, splits, strict=True))
    return TfdsSplits(train, test, tuple(names) if names else None,
                      tuple(features["image"].shape))
