"""The paper's augmentation, on the device: zero-pad, random crop, random horizontal flip."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Static (hashable) augmentation settings; pass as a static argument / closure to jit."""

    pad: int = 4
    crop: bool = True
    flip: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> AugmentConfig:
        """Build from the `data` config (keys pad, crop, flip)."""
        return cls(pad=int(config.pad), crop=bool(config.crop), flip=bool(config.flip))


def random_crop(key: jax.Array, images: jnp.ndarray, pad: int) -> jnp.ndarray:
    """Zero-pad each side by `pad`, then crop every image back to its size at a random offset."""
    if pad <= 0:
        return images
    n, h, w, _ = images.shape
    # Padding happens after normalisation, so a zero pixel is the (mean) background.
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)

    def crop_one(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop_one)(padded, offsets)


def random_flip(key: jax.Array, images: jnp.ndarray) -> jnp.ndarray:
    """Flip each image left-right with probability 1/2."""
    do_flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)


def augment(
    key: jax.Array, images: jnp.ndarray, pad: int = 4, flip: bool = True, crop: bool = True
) -> jnp.ndarray:
    """Pure, jittable: augment a float32 NHWC batch (already normalised) with PRNG `key`.

    `pad`, `flip` and `crop` must be static Python values; pad=0 or crop=False disables cropping.
    """
    crop_key, flip_key = jax.random.split(key)
    if crop:
        images = random_crop(crop_key, images, pad)
    if flip:
        images = random_flip(flip_key, images)
    return images
