"""Random-access image records for the streaming pipeline: `records[i] -> (name, image, label)`.

`image` is the file's encoded bytes (class folders, TFDS) or a decoded uint8 [H, W, C] array
(datasets small enough to read whole: archives, the bundled sample). Grain reads these by index,
so any process can fetch any example without reading the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from resnet_jax.data.catalog import DatasetInfo, DatasetNotFoundError
from resnet_jax.data.folders import ImageTree, SplitListing

Record = tuple[str, "bytes | np.ndarray", int]
# TFDS names the labelled held-out split differently per dataset.
TFDS_HELD_OUT = {"imagenet2012": "validation"}


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

    def __init__(self, source, name: str, indices: Sequence[int] | None = None):
        self.source, self.name = source, name
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        j = int(self.indices[i])
        example = self.source[j]
        image = example["image"]
        if not isinstance(image, bytes):
            image = np.asarray(image, np.uint8)
            image = image[..., None] if image.ndim == 2 else image
        return f"{self.name}[{j}]", image, int(example["label"])

    def subset(self, indices: Sequence[int]) -> TfdsRecords:
        """The records at `indices`."""
        return TfdsRecords(self.source, self.name, self.indices[indices])


def tfds_records(info: DatasetInfo, data_dir: str | None
                 ) -> tuple[TfdsRecords, TfdsRecords, tuple[str, ...] | None]:
    """(train, held-out, class names or None) of a prepared TFDS dataset, without TensorFlow.

    Raises DatasetNotFoundError (saying how to prepare it) when it is not prepared.
    """
    import tensorflow_datasets as tfds  # deferred: the import costs about a second

    from resnet_jax.data.tfds_source import _prepare

    builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
    held_out = TFDS_HELD_OUT.get(info.name, "test")
    splits = ["train", held_out]
    decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        sources = builder.as_data_source(split=splits, decoders=decoders)
    except Exception as e:  # TFDS raises KeyError / AssertionError / ... when not prepared
        if builder.is_prepared():
            raise DatasetNotFoundError(
                f"TFDS dataset {info.tfds_name!r} in {builder.data_dir} cannot be read as "
                "array_record (was it prepared with file_format='tfrecord'?). Re-prepare it "
                f"with file_format='array_record'. ({type(e).__name__}: {e})") from e
        _prepare(builder, info, data_dir)
        sources = builder.as_data_source(split=splits, decoders=decoders)
    names = None
    try:
        names = tuple(builder.info.features["label"].names)
    except (KeyError, AttributeError):
        pass
    train, test = (TfdsRecords(s, f"tfds:{info.tfds_name}/{split}")
                   for s, split in zip(sources, splits, strict=True))
    return train, test, names
