"""The resident loader of class-folder datasets: decode once (process pool), cache, map classes.

`load_folder` returns uint8 NHWC images and int32 labels per split, like the archive readers, so
the split, normalisation and on-device augmentation downstream do not know where pixels came from.
Classes are a catalogued dataset's (folder names must match them, labels follow the catalogue's
order) or, for `image_folder`, the sorted class folders of train/.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from resnet_jax.data.catalog import DATASETS, IMAGE_FOLDER
from resnet_jax.data.folder_cache import cache_file, read_cached, write_cached
from resnet_jax.data.folders import (
    HELD_OUT,
    TRAIN,
    DecodedSplit,
    FolderLayoutError,
    ImageTree,
    SplitListing,
    decode_many,
)

Split = tuple[np.ndarray, np.ndarray]
# Below this many images a pool costs more to start (each worker imports numpy and Pillow) than
# it saves.
PARALLEL_MIN_IMAGES = 2048
CHUNK = 1000  # images per pool task: large enough that pickling overhead stays small
MAX_WORKERS = 32


def decode_workers() -> int:
    """Processes used to decode: the CPUs this process may run on (at most MAX_WORKERS)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def folder_name(class_name: str) -> str:
    """The folder a class's images sit in: its name, with "/" (not allowed in a folder name)
    written "_" (Fashion-MNIST's "T-shirt/top" -> "T-shirt_top")."""
    return class_name.replace("/", "_")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stack(arrays: list[np.ndarray], tree: ImageTree, listing: SplitListing) -> np.ndarray:
    """One uint8 [N, H, W, C] array; all images must share H x W. Grayscale images in a split
    with colour ones are replicated to RGB."""
    sizes = Counter(a.shape[:2] for a in arrays)
    if len(sizes) > 1:
        (h, w), count = sizes.most_common(1)[0]
        bad = next(i for i, a in enumerate(arrays) if a.shape[:2] != (h, w))
        bh, bw = arrays[bad].shape[:2]
        raise FolderLayoutError(
            f"{tree.describe(listing.files[bad])} is {bh}x{bw} pixels, but {count} of the "
            f"{len(arrays)} images in {listing.split}/ are {h}x{w}: all images of a dataset must "
            "have one size (resize them first)"
        )
    channels = max(a.shape[2] for a in arrays)
    return np.stack([a if a.shape[2] == channels else np.repeat(a, channels, axis=2)
                     for a in arrays])


def _decode_in_pool(tree: ImageTree, files: Sequence[str], workers: int
                    ) -> list[np.ndarray] | None:
    """Decodes in `workers` processes; None if the pool broke (the caller decodes here)."""
    # "spawn": this process runs JAX's threads, and forking a threaded process can deadlock.
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            # Empty tasks start every worker now, so they import while the files are read.
            for _ in range(workers):
                pool.submit(decode_many, ())
            futures = [pool.submit(decode_many, chunk)
                       for chunk in _chunks(tree.read(files), CHUNK)]
            return [a for f in futures for a in f.result()]
    except BrokenProcessPool:
        # Spawned workers import the main script again; one without the
        # `if __name__ == "__main__":` guard starts its own work there and dies.
        print("note: the decoding processes failed (a script that loads data at its top level "
              "needs an `if __name__ == \"__main__\":` guard, or set "
              "config.data.decode_workers=1); decoding in this process instead.",
              file=sys.stderr, flush=True)
        return None


def decode_listings(tree: ImageTree, listings: Sequence[SplitListing],
                    workers: int | None = None) -> list[DecodedSplit]:
    """Decodes every file of `listings` (one pool for all), in processes when there are many."""
    for listing in listings:
        if not listing.files:
            raise FolderLayoutError(f"{tree.path}: {listing.split}/ holds no JPEG or PNG images "
                                    "in class folders")
        if listing.skipped:
            print(f"note: skipped {len(listing.skipped)} non-image file(s) in {tree.path}, e.g. "
                  f"{listing.skipped[0]}", file=sys.stderr)
    files = [f for listing in listings for f in listing.files]
    workers = decode_workers() if workers is None else max(1, workers)
    parallel = workers > 1 and len(files) >= PARALLEL_MIN_IMAGES
    what = " and ".join(f"{listing.split}/" for listing in listings)
    print(f"Decoding the {len(files)} images of {what} in {tree.path}"
          f"{f' with {workers} processes' if parallel else ''}, once: they are cached for later "
          "runs.", file=sys.stderr, flush=True)
    start = time.perf_counter()
    arrays = _decode_in_pool(tree, files, workers) if parallel else None
    if arrays is None:
        arrays = decode_many(list(tree.read(files)))
    out, offset = [], 0
    for listing in listings:
        mine = arrays[offset:offset + len(listing.files)]
        offset += len(listing.files)
        out.append(DecodedSplit(listing.split, listing.classes, listing.files,
                                _stack(mine, tree, listing), listing.labels))
    print(f"Decoded {len(files)} images in {time.perf_counter() - start:.1f} s.",
          file=sys.stderr, flush=True)
    return out


def decoded_splits(tree: ImageTree, splits: Sequence[str], cache_dir: str | None = None,
                   workers: int | None = None) -> dict[str, DecodedSplit]:
    """`splits` (TRAIN, HELD_OUT) of `tree`: from the cache where the source is unchanged, the
    others decoded together and cached."""
    out, missing = {}, []
    for split in splits:
        fingerprint = tree.fingerprint(split)
        path = cache_file(cache_dir, tree.path, split)
        cached = read_cached(path, fingerprint)
        if cached is None:
            missing.append((split, path, fingerprint))
        else:
            out[split] = cached
    if missing:
        listings = [tree.list_split(split) for split, _, _ in missing]
        for (split, path, fingerprint), decoded in zip(
                missing, decode_listings(tree, listings, workers), strict=True):
            write_cached(path, fingerprint, decoded)
            out[split] = decoded
    return {split: out[split] for split in splits}


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [..., C] images as `channels` (1 or 3) channels: grayscale replicated to RGB, RGB
    to ITU-R 601-2 luma in Pillow's integer arithmetic (equal to `convert("L")`)."""
    have = images.shape[-1]
    if have == channels:
        return images
    if channels == 3 and have == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 1 and have == 3:
        x = images.astype(np.uint32)
        luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def class_labels(decoded: DecodedSplit | SplitListing, classes: Sequence[str], tree: ImageTree,
                 dataset: str, require_all: bool) -> np.ndarray:
    """The split's labels as indices into `classes`; every folder must be one of them.

    Takes a decoded split or a listing alike (the streaming pipeline has only the latter)."""
    index = {folder_name(c): i for i, c in enumerate(classes)}
    expected = ", ".join(index)
    unknown = [c for c in decoded.classes if c not in index]
    if unknown:
        raise FolderLayoutError(
            f"{tree.path}: folder {decoded.split}/{unknown[0]}/ is not a class of {dataset} "
            f"(unexpected: {', '.join(unknown)}). Expected class folders: {expected}"
            + ("" if dataset not in DATASETS else
               "; use config.data.name=image_folder for a dataset with other classes")
        )
    missing = [c for c in index if c not in decoded.classes]
    if require_all and missing:
        raise FolderLayoutError(
            f"{tree.path}: {decoded.split}/ has no folder for the {dataset} class(es) "
            f"{', '.join(missing)}. Expected class folders: {expected}"
        )
    lut = np.asarray([index[c] for c in decoded.classes], np.int32)
    return lut[decoded.labels] if len(decoded.labels) else np.zeros(0, np.int32)


def _check_size(decoded: DecodedSplit, image_shape: tuple[int, int, int], tree: ImageTree,
                expected: str) -> None:
    h, w = decoded.images.shape[1:3]
    if (h, w) != tuple(image_shape[:2]):
        eh, ew, ec = image_shape
        raise FolderLayoutError(
            f"{tree.describe(decoded.files[0])} (like every image in {decoded.split}/) is "
            f"{h}x{w} pixels; {expected} are {eh}x{ew}x{ec}"
        )


def load_folder(data_dir: str, *, dataset: str, splits: Sequence[str] = (TRAIN, HELD_OUT),
                classes: Sequence[str] | None = None,
                image_shape: tuple[int, int, int] | None = None,
                cache_dir: str | None = None, workers: int | None = None,
                ) -> tuple[dict[str, Split], tuple[str, ...], tuple[int, int, int]]:
    """`({split: (images, labels)}, class_names, image_shape)` of a class-folder dataset.

    With `classes` and `image_shape` (a catalogued dataset, or a trained run's spec) the class
    folders must be those classes (train/ all of them) and the images that H x W; channels are
    converted to the given count. Without them (`image_folder`) the classes are train/'s sorted
    folder names and the shape is train/'s.
    """
    if (classes is None) != (image_shape is None):
        raise ValueError("pass both classes and image_shape, or neither")
    if classes is None and TRAIN not in splits:
        raise ValueError("without given classes the train split defines them")
    tree = ImageTree(data_dir)
    decoded = decoded_splits(tree, splits, cache_dir, workers)
    given = classes is not None
    if dataset != IMAGE_FOLDER:
        expected = f"{dataset} images"
    else:
        expected = "the images this run was trained on" if given else "the train/ images"
    if classes is None:
        classes = decoded[TRAIN].classes
        image_shape = tuple(int(d) for d in decoded[TRAIN].images.shape[1:])
    out = {}
    for s, d in decoded.items():
        _check_size(d, image_shape, tree, expected)
        labels = class_labels(d, classes, tree, dataset, require_all=given and s == TRAIN)
        out[s] = (to_channels(d.images, image_shape[2]), labels)
    return out, tuple(classes), tuple(image_shape)
