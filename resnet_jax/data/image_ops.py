"""Per-image preprocessing on the host's CPUs, for the streaming pipeline.

Only what changes an image's size runs here: training takes an Inception-style random-resized
crop (area 8%-100%, aspect ratio 3/4-4/3, as the ResNet papers' ImageNet recipe) and a random
horizontal flip; evaluation resizes the shorter side to 256/224 of the crop and takes the centre
crop. Images stay uint8; normalisation (and the CIFAR recipe's pad-and-crop, which keeps the
size) happens on the device, as in the resident pipeline.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# The evaluation resize for a crop of `size`: 256 for 224, the ratio of the ResNet papers.
EVAL_RESIZE_RATIO = 256 / 224
RESAMPLE = Image.Resampling.BILINEAR


def _as_array(img: Image.Image) -> np.ndarray:
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int,
                                                                                    int]:
    """(left, top, right, bottom) of a crop covering `scale` of the area at an aspect ratio in
    `ratio` (log-uniform); after 10 misses, the largest centred crop within `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random-resized crop of `img`, resized to `size` x `size` (one resampling)."""
    box = random_resized_crop_box(img.width, img.height, rng)
    return _as_array(img.resize((size, size), RESAMPLE, box=box))


def eval_resize(size: int) -> int:
    """The shorter side an image is resized to before its centre `size` crop (256 for 224)."""
    return round(size * EVAL_RESIZE_RATIO)


def resize_center_crop(img: Image.Image, size: int,
                       resize: int | None = None) -> np.ndarray:
    """Shorter side resized to `resize` (default `eval_resize(size)`), then the centre `size`
    crop."""
    resize = resize or eval_resize(size)
    scale = resize / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    # The crop's box in the original image's coordinates: resize only what is kept.
    left, top = (w - size) / 2 / scale, (h - size) / 2 / scale
    box = (left, top, left + size / scale, top + size / scale)
    return _as_array(img.resize((size, size), RESAMPLE, box=box))


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Left-right flip with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def channels(image: np.ndarray, count: int) -> np.ndarray:
    """uint8 [H, W, C] as `count` channels (grayscale replicated; RGB to Pillow's luma)."""
    have = image.shape[-1]
    if have == count:
        return image
    if count == 3:
        return np.repeat(image, 3, axis=-1)
    return _as_array(Image.fromarray(image).convert("L"))
