"""The streaming pipeline: Grain reads, decodes and crops batches on the host's CPUs.

For data larger than device memory (ImageNet, big image folders). Each process reads only its
rows of each global batch, and the batch of step s is a pure function of (seed, s):

    records -> shuffle (a new order each epoch) -> repeat -> decode + crop + flip (random_map:
    the randomness of example i is seeded by (seed, i)) -> batch(global / processes)
    -> [process_index :: process_count]

so process p's k-th local batch holds rows p*L..(p+1)*L-1 of global batch k, whatever the number
of processes, and a Grain iterator's state (its next index, saved in every checkpoint) is all a
resumed run needs. Images reach the device as uint8; normalisation happens there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import grain
import ml_collections
import numpy as np
from PIL import Image

from resnet_jax.data import image_ops
from resnet_jax.data.catalog import IMAGE_FOLDER, DatasetInfo, get_info
from resnet_jax.data.folder_source import class_labels, to_channels
from resnet_jax.data.folders import (
    HELD_OUT,
    TRAIN,
    ImageDecodeError,
    ImageTree,
    open_image,
)
from resnet_jax.data.loader import DataSpec, load_raw, resolve_source
from resnet_jax.data.preprocess import NormStats, compute_stats
from resnet_jax.data.records import ArrayRecords, FolderRecords, Records, tfds_records
from resnet_jax.data.splits import split_indices

# Datasets that never fit on the devices: "auto" streams them.
ALWAYS_STREAM = ("imagenet2012",)
# Local batches each reading thread may hold ready beyond the one it is decoding.
PREFETCH_PER_THREAD = 2


@dataclasses.dataclass
class StreamSplits:
    """The splits as random-access records, the spec and the normalisation statistics."""

    train: Records
    validation: Records
    test: Records
    spec: DataSpec
    stats: NormStats
    image_size: int | None


def resolve_pipeline(config: ml_collections.ConfigDict) -> str:
    """"device" or "stream" for the `data` config: auto streams imagenet2012 and images resized
    on the fly (image_size), and keeps everything else on the devices."""
    if config.pipeline != "auto":
        if config.pipeline == "device" and config.name in ALWAYS_STREAM:
            raise ValueError(
                f"config.data.pipeline='device' cannot hold {config.name!r} on the devices; use "
                "'stream' or 'auto'")
        return config.pipeline
    if config.name in ALWAYS_STREAM or config.get("image_size") is not None:
        return "stream"
    return "device"


def threads(config: ml_collections.ConfigDict) -> int:
    """Reading and decoding threads: config.data.stream_threads, or one per CPU."""
    if config.stream_threads:
        return int(config.stream_threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def grain_seeds(seed: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) of a run's seed: independent 32-bit streams."""
    shuffle, augment = np.random.SeedSequence([seed, 0x5EED]).generate_state(2)
    return int(shuffle), int(augment)


# --- opening the splits -----------------------------------------------------------------------
def _folder_splits(config, info: DatasetInfo | None):
    tree = ImageTree(config.data_dir)
    train_listing = tree.list_split(TRAIN)
    held_listing = tree.list_split(HELD_OUT)
    if info is None or info.classes_from_data:
        classes, check_name = train_listing.classes, IMAGE_FOLDER  # the folders define them
    else:
        classes, check_name = info.class_names, info.name
    train = FolderRecords(tree, train_listing,
                          class_labels(train_listing, classes, tree, check_name,
                                       require_all=check_name != IMAGE_FOLDER))
    test = FolderRecords(tree, held_listing,
                         class_labels(held_listing, classes, tree, check_name, False))
    if not len(train):
        raise ValueError(f"{tree.path}: train/ holds no images")
    return train, test, tuple(classes)


def open_held_out(config: ml_collections.ConfigDict, trained: DataSpec,
                  stats: NormStats) -> StreamSplits:
    """The held-out split alone of a trained run's class folders: train/ is neither listed nor
    needed, the classes and image shape are the run's (a folder outside its classes is an
    error naming it). Other sources are opened whole, as `open_stream` does."""
    info = None if config.name == IMAGE_FOLDER else get_info(config.name)
    if resolve_source(info, config.source, config.data_dir) != "folder":
        return open_stream(config, stats)
    tree = ImageTree(config.data_dir)
    listing = tree.list_split(HELD_OUT)
    test = FolderRecords(tree, listing, class_labels(listing, trained.class_names, tree,
                                                     "the trained run", require_all=False))
    empty = test.subset(np.zeros(0, np.int64))
    spec = dataclasses.replace(trained, num_test=len(test))
    return StreamSplits(empty, empty, test, spec, stats, config.get("image_size"))


def _array_splits(config, info: DatasetInfo):
    (x, y), (xt, yt), names, _ = load_raw(config.name, config.source, config.data_dir)
    return (ArrayRecords(x, y, f"{config.name}/train"), ArrayRecords(xt, yt, f"{config.name}/test"),
            tuple(names))


def _decoded(records, i: int) -> np.ndarray:
    name, image, _ = records[i]
    array = image if isinstance(image, np.ndarray) else np.asarray(open_image(image, name))
    return array if array.ndim == 3 else array[..., None]


def _channels_of(records, probes: int = 32) -> int:
    """An image folder's channels: 3 if any of `probes` images spread over it is in colour
    (grayscale files are then replicated), else 1; the resident loader's rule, on a sample."""
    picks = np.unique(np.linspace(0, len(records) - 1, probes).astype(int))
    return 3 if any(_decoded(records, int(i)).shape[-1] == 3 for i in picks) else 1


def open_stream(config: ml_collections.ConfigDict, stats: NormStats | None = None
                ) -> StreamSplits:
    """Lists (does not read) the `data` config's dataset for streaming; `stats` (e.g. a resumed
    run's) skips estimating the normalisation statistics from a sample of training images."""
    info = None if config.name == IMAGE_FOLDER else get_info(config.name)
    source = resolve_source(info, config.source, config.data_dir)
    channels = None  # what the source declares; else the catalogue's or the first image's
    if source == "folder":
        train, test, classes = _folder_splits(config, info)
    elif source == "tfds":
        prepared = tfds_records(info, config.data_dir)
        train, test, names = prepared.train, prepared.test, prepared.class_names
        channels = prepared.image_shape[-1]  # a grayscale JPEG in ImageNet is still RGB
        classes = names if names and len(names) == info.num_classes else info.class_names
    else:  # archives and the bundled sample: small enough to read whole, streamed from memory
        train, test, classes = _array_splits(config, info)
    size = config.get("image_size")
    first = _decoded(train, 0)
    if channels is None:
        channels = info.image_shape[2] if info is not None else _channels_of(train)
    shape = (size, size, channels) if size else (*first.shape[:2], channels)
    train_idx, val_idx = split_indices(len(train), config.validation_size, config.split_seed)
    train, validation = train.subset(train_idx), train.subset(val_idx)
    spec = DataSpec(name=config.name, source=source, num_classes=len(classes),
                    image_shape=tuple(int(d) for d in shape), class_names=tuple(classes),
                    num_train=len(train), num_validation=len(validation), num_test=len(test))
    if stats is None:
        stats = sample_stats(train, spec, size, config.normalization, config.stats_images,
                             config.split_seed, threads(config))
    return StreamSplits(train, validation, test, spec, stats, size)


def sample_stats(train, spec: DataSpec, size: int | None, method: str, count: int, seed: int,
                 workers: int) -> NormStats:
    """The normalisation statistics of `count` training images drawn with `seed` (all of them if
    there are fewer), each preprocessed as for evaluation. Fixed statistics read no image."""
    if method in ("imagenet", "none"):
        return compute_stats(np.zeros((1, 1, 1, spec.image_shape[2]), np.uint8), method)
    picked = np.sort(np.random.default_rng(seed).permutation(len(train))[:max(1, count)])
    load = EvalImage(train, spec, size)
    with ThreadPoolExecutor(workers) as pool:
        images = np.stack(list(pool.map(lambda i: load(int(i))[0], picked)))
    return compute_stats(images, method)


# --- per-example transforms (classes, so that Grain can pickle them for worker processes) ----
class _Decoder:
    def __init__(self, spec: DataSpec, size: int | None):
        self.shape = tuple(spec.image_shape)
        self.size = size

    def pil(self, name: str, image) -> Image.Image:
        if isinstance(image, np.ndarray):
            return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return open_image(image, name)

    def array(self, name: str, image) -> np.ndarray:
        """The decoded image at its own size, checked against the spec's."""
        if not isinstance(image, np.ndarray):
            image = np.asarray(open_image(image, name))
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[:2] != self.shape[:2]:
            raise ImageDecodeError(
                f"{name} is {image.shape[0]}x{image.shape[1]} pixels, but this dataset's images "
                f"are {self.shape[0]}x{self.shape[1]}; set config.data.image_size to crop and "
                "resize images of any size")
        return image

    def center(self, name: str, image, draft: bool) -> np.ndarray:
        """The resize and centre crop to `size`; with `draft`, file bytes are decoded no larger
        than the crop needs (faster, pixels slightly different)."""
        if draft and isinstance(image, bytes):
            return image_ops.decode_resize_center_crop(image, name, self.size)
        return image_ops.resize_center_crop(self.pil(name, image), self.size)

    def finish(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(to_channels(image, self.shape[2]))


class TrainImage(_Decoder):
    """record -> (uint8 image, label): random-resized crop and flip with `image_size`, else the
    image as it is (the device pads, crops and flips it as in the resident pipeline)."""

    def __init__(self, spec: DataSpec, size: int | None, crop: bool, flip: bool):
        super().__init__(spec, size)
        self.crop, self.flip = crop, flip

    def __call__(self, record, rng: np.random.Generator):
        name, image, label = record
        if self.size is None:
            return self.finish(self.array(name, image)), np.int32(label)
        if not self.crop:
            out = self.center(name, image, draft=True)
        elif isinstance(image, bytes):  # decoded no larger than the crop needs
            out = image_ops.decode_random_resized_crop(image, name, rng, self.size)
        else:
            out = image_ops.random_resized_crop(self.pil(name, image), rng, self.size)
        if self.flip:
            out = image_ops.random_flip(out, rng)
        return self.finish(out), np.int32(label)


class EvalImage(_Decoder):
    """index -> (uint8 image, label, mask) over a split padded to whole batches: resize and
    centre crop with `image_size`; indices past the split give a zero image with mask False.

    Images are decoded in full (no JPEG draft): evaluation is the standard resize and crop, and
    `resnet-jax predict` converts a file to exactly these pixels."""

    def __init__(self, records, spec: DataSpec, size: int | None):
        super().__init__(spec, size)
        self.records = records

    def __call__(self, index: int):
        if index >= len(self.records):
            return np.zeros(self.shape, np.uint8), np.int32(0), np.bool_(False)
        name, image, label = self.records[index]
        if self.size is None:
            out = self.array(name, image)
        else:
            out = self.center(name, image, draft=False)
        return self.finish(out), np.int32(label), np.bool_(True)


# --- the datasets -------------------------------------------------------------------------------
def local_batch_size(global_batch: int, process_count: int) -> int:
    """Rows of each global batch one process reads."""
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} does not divide over {process_count} "
                         "processes")
    return global_batch // process_count


def train_dataset(splits: StreamSplits, batch_size: int, seed: int, *, crop: bool = True,
                  flip: bool = True, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """This process's local training batches, indexed by step: element s is step s's
    `(images uint8 [L, H, W, C], labels int32 [L])`."""
    shuffle_seed, augment_seed = grain_seeds(seed)
    local = local_batch_size(batch_size, process_count)
    ds = grain.MapDataset.source(splits.train).shuffle(seed=shuffle_seed).repeat()
    ds = ds.random_map(TrainImage(splits.spec, splits.image_size, crop, flip), seed=augment_seed)
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def eval_dataset(splits: StreamSplits, split: str, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> tuple[grain.MapDataset, int]:
    """(this process's local batches of a whole split, the split's size): every example once,
    in order, the last global batch padded and masked."""
    records = {"validation": splits.validation, "test": splits.test}[split]
    n = len(records)
    local = local_batch_size(batch_size, process_count)
    padded = math.ceil(n / batch_size) * batch_size
    ds = grain.MapDataset.range(padded).map(EvalImage(records, splits.spec, splits.image_size))
    return ds.batch(local)[process_index::process_count], n


def iterate(ds: grain.MapDataset, num_threads: int) -> grain.DatasetIterator:
    """A checkpointable iterator reading `num_threads` batches in parallel, a few ahead."""
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=PREFETCH_PER_THREAD * num_threads)
    return iter(ds.to_iter_dataset(options))


def close(iterator: grain.DatasetIterator) -> None:
    """Stops an iterator's reading threads (Grain versions without `close` stop them on
    garbage collection)."""
    stop = getattr(iterator, "close", None)
    if stop is not None:
        stop()


def read_eval(splits: StreamSplits, split: str, batch_size: int, num_threads: int, *,
              process_index: int = 0, process_count: int = 1):
    """This process's local `(images, labels, mask)` batches of `split`, read once through
    `eval_dataset` with `num_threads` threads, which stop when the batches are used up."""
    ds, _ = eval_dataset(splits, split, batch_size, process_index=process_index,
                         process_count=process_count)
    iterator = iterate(ds, num_threads)
    try:
        yield from iterator
    finally:
        close(iterator)
