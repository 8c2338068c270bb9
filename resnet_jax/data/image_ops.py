"""Per-image preprocessing on the host's CPUs, for the streaming pipeline.

Only what changes an image's size runs here: training takes an Inception-style random-resized
crop (area 8%-100%, aspect ratio 3/4-4/3, as the ResNet papers' ImageNet recipe) and a random
horizontal flip; evaluation resizes the shorter side to 256/224 of the crop and takes the centre
crop. Images stay uint8; normalisation (and the CIFAR recipe's pad-and-crop, which keeps the
size) happens on the device, as in the resident pipeline.

From encoded bytes (`decode_random_resized_crop`, `decode_resize_center_crop`) the crop box is
chosen from the file's size before decoding, and a JPEG whose box spans at least 2x the output
on both sides is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's scaled inverse DCT, Pillow's
`draft`), never below the output's resolution inside the box. Measured in docs/performance.md:
1.5x the images/s for training crops of 800-1600 px photos; ImageNet-sized images (300-500 px)
rarely qualify and decode exactly as before. The streaming pipeline drafts training crops only:
its evaluation decodes in full, so that `predict` computes the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from resnet_jax.data.folders import open_image_reduced

# The evaluation resize for a crop of `size`: 256 for 224, the ratio of the ResNet papers.
EVAL_RESIZE_RATIO = 256 / 224
RESAMPLE = Image.Resampling.BILINEAR
# libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 of the size (the ones Pillow's `draft` asks for).
JPEG_SCALES = (8, 4, 2, 1)

Box = tuple[float, float, float, float]


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


def center_crop_box(width: int, height: int, size: int, resize: int | None = None) -> Box:
    """(left, top, right, bottom) in the image of the centre `size` crop taken after resizing
    its shorter side to `resize` (default `eval_resize(size)`)."""
    resize = resize or eval_resize(size)
    scale = resize / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (w - size) / 2 / scale, (h - size) / 2 / scale
    return left, top, left + size / scale, top + size / scale


def resize_center_crop(img: Image.Image, size: int,
                       resize: int | None = None) -> np.ndarray:
    """Shorter side resized to `resize` (default `eval_resize(size)`), then the centre `size`
    crop."""
    # The crop's box in the original image's coordinates: resize only what is kept.
    box = center_crop_box(img.width, img.height, size, resize)
    return _as_array(img.resize((size, size), RESAMPLE, box=box))


def draft_factor(box: Box, size: int) -> int:
    """The largest JPEG decoding scale (8, 4, 2 or 1) at which `box` still spans at least `size`
    pixels in both directions, so the resize to `size` never upsamples what the decoder
    shrank."""
    width, height = box[2] - box[0], box[3] - box[1]
    return next(f for f in JPEG_SCALES if f == 1 or min(width, height) / f >= size)


def decode_and_resize(data: bytes, name: str, box_of: Callable[[int, int], Box],
                      size: int) -> np.ndarray:
    """Decodes an image file's bytes and resizes `box_of(width, height)` of it to `size` x
    `size`, a JPEG decoded at the smallest scale `draft_factor` allows for that box."""
    chosen = []

    def factor_for(width: int, height: int) -> int:
        chosen.append(box_of(width, height))
        return draft_factor(chosen[0], size)

    img, factor = open_image_reduced(data, name, factor_for)
    box = tuple(c / factor for c in chosen[0])  # file pixel x is at x / factor in the image
    return _as_array(img.resize((size, size), RESAMPLE, box=box))


def decode_random_resized_crop(data: bytes, name: str, rng: np.random.Generator,
                               size: int) -> np.ndarray:
    """`random_resized_crop` of an image file's bytes (the same box for the same `rng`),
    decoded no larger than the box needs."""
    return decode_and_resize(data, name, lambda w, h: random_resized_crop_box(w, h, rng), size)


def decode_resize_center_crop(data: bytes, name: str, size: int) -> np.ndarray:
    """`resize_center_crop` of an image file's bytes, decoded no larger than the crop needs."""
    return decode_and_resize(data, name, lambda w, h: center_crop_box(w, h, size), size)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Left-right flip with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image
