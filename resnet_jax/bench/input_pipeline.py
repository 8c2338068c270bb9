"""The input-pipeline rows of `resnet-jax bench`: the streaming pipeline on 224 px JPEG batches.

Times the library's own `resnet_jax.data.stream` (`open_stream`, `train_dataset`, `iterate`)
over an ImageNet-layout class folder, with the training transform (random-resized crop to
`image_size` and flip), at 1 thread and at `threads`, in alternating windows. Without a folder
of the user's, the bench writes a small one in a temporary directory: photo-like JPEGs of mixed
sizes (default 300-500 px sides, quality 90: file sizes like ImageNet's). Files are read from
the page cache after the first window, so this is the CPU cost of decoding and cropping, not
the disk's. img/s per CPU core counts this process's CPU time, so other jobs on the machine
do not lower it; `cores_needed` divides a train step's img/s by it.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

# Sides of the generated images: ImageNet's photos are mostly 300-500 px (500x375 the commonest).
DEFAULT_SIDES = (300, 500)
JPEG_QUALITY = 90


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: smooth colour gradients and soft blobs under mid-frequency
    texture and pixel noise, so that a JPEG of it is about as large as a photo's (~70-100 KB at
    400x400, quality 90). Random noise alone would compress far worse, flat colour far better."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    image = rng.uniform(40, 200, 3) + rng.uniform(-80, 80, 3) * x + rng.uniform(-80, 80, 3) * y
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        image = image + rng.uniform(-60, 60, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)
    coarse = np.clip(rng.normal(128, 35, (height // 4 + 1, width // 4 + 1, 3)), 0, 255)
    texture = Image.fromarray(coarse.astype(np.uint8)).resize((width, height),
                                                              Image.Resampling.BICUBIC)
    image = image + np.asarray(texture, np.float32) - 128 + rng.normal(0, 10, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """`image` (uint8 [H, W, 3]) encoded as a JPEG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg_folder(root: str | os.PathLike, num_images: int, *, classes: int = 4,
                      sides: tuple[int, int] = DEFAULT_SIDES, seed: int = 0) -> dict:
    """Writes ImageNet's layout under `root`: `train/class_k/*.JPEG` (`num_images` photo-like
    images, height and width each uniform in `sides`) and one `val/class_k/` image per class.
    Returns what was written: counts, sides and mean file size."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    sizes = []
    for split, count in (("train", num_images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            height, width = (int(s) for s in rng.integers(sides[0], sides[1] + 1, 2))
            data = jpeg_bytes(photo_like(rng, height, width))
            (folder / f"{split}_{i:05d}.JPEG").write_bytes(data)
            if split == "train":
                sizes.append(len(data))
    return {"images": num_images, "classes": classes, "sides": list(sides),
            "mean_file_bytes": float(np.mean(sizes)), "quality": JPEG_QUALITY}


def stream_config(data_dir: str, image_size: int, threads: int):
    """The `data` config that streams `data_dir` as the imagenet_resnet50 preset does (random-
    resized crop + flip to `image_size`, fixed ImageNet statistics), every image for training."""
    from resnet_jax.data.config import default_data_config

    config = default_data_config()
    config.name = "image_folder"
    config.source = "folder"
    config.data_dir = str(data_dir)
    config.pipeline = "stream"
    config.image_size = image_size
    config.normalization = "imagenet"
    config.validation_size = 0
    config.stream_threads = threads
    return config


def time_window(ds, threads: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) to read every batch of `ds` (a slice of the
    training batches) with a fresh iterator of `threads` threads: a warm iterator's prefetched
    batches would count as free."""
    from resnet_jax.data import stream

    iterator = stream.iterate(ds, threads)
    t, cpu = time.perf_counter(), time.process_time()
    count = sum(1 for _ in iterator)
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    if count != len(ds):
        raise RuntimeError(f"the input window read {count} batches, expected {len(ds)}")
    return elapsed, cpu


def bench_input(data_dir: str, *, batch_size: int, image_size: int, threads: int | None,
                windows: int, batches_per_thread: int, seed: int = 0) -> dict:
    """img/s of the streaming training pipeline over `data_dir` at 1 thread and at `threads`
    (None: config.data.stream_threads' default, one per CPU), in alternating windows of
    `batches_per_thread` x threads batches, after one untimed warm-up window each.

    Per CPU core is images per second of this process's CPU time (all its threads): unlike
    wall-clock img/s / threads it does not fall when other processes share the cores."""
    from resnet_jax.data import stream

    config = stream_config(data_dir, image_size, threads or 0)
    n = stream.threads(config)
    splits = stream.open_stream(config)
    ds = stream.train_dataset(splits, batch_size, seed)
    counts = sorted({1, n})
    times = {c: [] for c in counts}
    cpu_times = {c: [] for c in counts}
    start = 0
    load = [os.getloadavg()[0]]
    for window in range(windows + 1):  # window 0 warms the page cache and the code paths
        for c in counts:
            length = batches_per_thread * c
            seconds, cpu = time_window(ds[start:start + length], c)
            start += length
            if window:
                times[c].append(seconds / length)  # per batch
                cpu_times[c].append(cpu / length)
    load.append(os.getloadavg()[0])
    rows = []
    for c in counts:
        med = statistics.median(times[c])
        rows.append({"threads": c, "batch_size": batch_size, "windows": windows,
                     "batches_per_window": batches_per_thread * c,
                     "step_s_median": med, "step_s_min": min(times[c]),
                     "step_s_max": max(times[c]), "step_s_windows": times[c],
                     "images_per_s": batch_size / med,
                     "images_per_s_min": batch_size / max(times[c]),
                     "images_per_s_max": batch_size / min(times[c]),
                     "images_per_s_per_thread": batch_size / med / c,
                     "cpu_s_windows": cpu_times[c],
                     "images_per_cpu_s": batch_size / statistics.median(cpu_times[c])})
    return {"data_dir": str(data_dir), "num_train": splits.spec.num_train,
            "image_size": image_size, "transform": "random-resized crop + flip",
            "rows": rows, "threads": n, "cpu_count": os.cpu_count(),
            "load_average": load,
            # Per core: at the most threads measured, as the pipeline runs them.
            "images_per_s_per_core": rows[-1]["images_per_cpu_s"]}


@contextmanager
def input_folder(data_dir: str | None, num_images: int, sides: tuple[int, int] = DEFAULT_SIDES
                 ) -> Iterator[tuple[str, dict | None]]:
    """(`data_dir`, None), or a generated folder of `num_images` JPEGs in a temporary directory
    (removed afterwards) with what `write_jpeg_folder` wrote."""
    if data_dir:
        yield data_dir, None
        return
    with tempfile.TemporaryDirectory(prefix="resnet_jax_bench_jpeg_") as tmp:
        written = write_jpeg_folder(tmp, num_images, sides=sides)
        yield tmp, written


def cores_needed(train_images_per_s: float, pipeline_images_per_s_per_core: float) -> float:
    """CPU cores the streaming pipeline needs to keep a train step fed: the step's img/s over
    the pipeline's img/s per core (e.g. 3,000 img/s on a GPU / 250 img/s per core = 12 cores)."""
    if pipeline_images_per_s_per_core <= 0:
        raise ValueError(f"pipeline img/s per core must be > 0, got "
                         f"{pipeline_images_per_s_per_core}")
    return train_images_per_s / pipeline_images_per_s_per_core


def feeding(report_rows: list[dict], per_core: float) -> list[dict]:
    """For each ImageNet-family train row (its input is the pipeline's batches): the cores
    needed to feed it."""
    return [{"model": r["model"], "dtype": r["dtype"], "train_images_per_s": r["images_per_s"],
             "cores_needed": cores_needed(r["images_per_s"], per_core)}
            for r in report_rows if r["step"] == "train" and r.get("streamed")]
