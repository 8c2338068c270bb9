"""Normalisation: statistics computed once on the host, applied on the device inside jit."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from resnet_jax.data.config import NORMALIZATIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormStats(NamedTuple):
    """`(x - mean) / std` on the 0..255 scale; a NamedTuple so it is a pytree for jit.

    mean is [H, W, C] ("mean_image") or [C]; std is [C].
    """

    mean: np.ndarray
    std: np.ndarray


def compute_stats(train_images: np.ndarray, method: str) -> NormStats:
    """Statistics of the uint8 NHWC training split (pass the split after removing validation).

    - "mean_image": the paper's per-pixel mean image; divided by 255 only to keep inputs O(1).
    - "per_channel": mean and standard deviation of each channel.
    - "imagenet": the fixed ImageNet RGB mean and std everyone uses (nothing is computed).
    - "none": no centring, pixels scaled to [0, 1].
    """
    c = train_images.shape[-1]
    if method == "imagenet":
        return imagenet_stats(c)
    if method == "mean_image":
        # float64 accumulation: 45k images summed in float32 lose low bits.
        mean = train_images.mean(axis=0, dtype=np.float64)
        return NormStats(mean.astype(np.float32), np.full((c,), 255.0, np.float32))
    if method == "per_channel":
        x = train_images.reshape(-1, c)
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        return NormStats(mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32))
    if method == "none":
        return NormStats(np.zeros((c,), np.float32), np.full((c,), 255.0, np.float32))
    raise ValueError(f"normalization={method!r} is not valid; choose one of {NORMALIZATIONS}")


def imagenet_stats(channels: int = 3) -> NormStats:
    """The ImageNet training set's per-channel RGB mean and std on the 0..255 scale; their
    average for one channel."""
    mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
    std = np.asarray(IMAGENET_STD, np.float32) * 255
    if channels == 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return NormStats(mean, std)


def normalize(images_u8: jnp.ndarray, stats: NormStats) -> jnp.ndarray:
    """Pure, jittable: uint8 [..., H, W, C] -> float32 normalised images."""
    x = jnp.asarray(images_u8).astype(jnp.float32)
    return (x - jnp.asarray(stats.mean)) / jnp.asarray(stats.std)
