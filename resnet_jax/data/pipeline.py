"""Exact, resumable epochs: the batch at global step s is a pure jittable function of (seed, s)."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data.augment import AugmentConfig, augment
from resnet_jax.data.preprocess import NormStats, normalize


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Full batches per epoch; the remainder of each epoch's permutation is dropped."""
    if batch_size <= 0 or batch_size > num_train:
        raise ValueError(f"batch_size={batch_size} must be in [1, {num_train}]")
    return num_train // batch_size


def data_keys(seed_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(shuffle_key, aug_key) derived from the data seed key; split so they never collide."""
    shuffle_key, aug_key = jax.random.split(seed_key)
    return shuffle_key, aug_key


def epoch_permutation(seed_key: jax.Array, epoch: jax.Array | int, num_train: int) -> jax.Array:
    """Pure, jittable: the order of epoch `epoch`, int32 [num_train]."""
    shuffle_key, _ = data_keys(seed_key)
    return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_train)


def batch_indices(
    seed_key: jax.Array, step: jax.Array | int, num_train: int, batch_size: int
) -> jax.Array:
    """Pure, jittable: training-set indices of global step `step` (a traced int32 is fine)."""
    spe = steps_per_epoch(num_train, batch_size)
    step = jnp.asarray(step, jnp.int32)
    perm = epoch_permutation(seed_key, step // spe, num_train)
    return jax.lax.dynamic_slice(perm, ((step % spe) * batch_size,), (batch_size,))


def train_batch(
    images_u8: jax.Array,
    labels: jax.Array,
    stats: NormStats,
    seed_key: jax.Array,
    step: jax.Array | int,
    batch_size: int,
    aug: AugmentConfig,
    out_sharding: jax.sharding.Sharding | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pure, jittable: gather, normalise and augment the batch of global step `step`.

    images_u8 [N, H, W, C] uint8 and labels [N] are the whole training split on the device;
    `batch_size` and `aug` must be static. The augmentation key is fold_in(aug_key, step), so a
    run resumed at step k reproduces the uninterrupted run exactly. `out_sharding` (e.g.
    NamedSharding(mesh, P("data"))) constrains the batch so each device only augments its rows.
    """
    idx = batch_indices(seed_key, step, images_u8.shape[0], batch_size)
    x = jnp.take(images_u8, idx, axis=0)
    y = jnp.take(labels, idx, axis=0).astype(jnp.int32)
    if out_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, out_sharding)
        y = jax.lax.with_sharding_constraint(y, out_sharding)
    x = normalize(x, stats)
    _, aug_key = data_keys(seed_key)
    x = augment(jax.random.fold_in(aug_key, step), x, pad=aug.pad, flip=aug.flip, crop=aug.crop)
    return x, y


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Host-side: yield (images, labels, mask) covering every example exactly once.

    The last batch is zero-padded to `batch_size` (a fixed shape, so jit compiles once) and its
    mask is False on the padding; sum metrics weighted by the mask.
    """
    n = len(images)
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        k = len(x)
        mask = np.zeros((batch_size,), bool)
        mask[:k] = True
        if k < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - k, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((batch_size - k,), y.dtype)])
        yield x, y, mask
