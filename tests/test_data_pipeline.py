"""Device-side data pipeline: normalisation stats, augmentation, exact epochs, eval, sharding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.data import (
    AugmentConfig,
    NormStats,
    augment,
    batch_indices,
    compute_stats,
    default_data_config,
    epoch_permutation,
    eval_batches,
    load_dataset,
    normalize,
    replicate,
    shard_batch,
    split_indices,
    steps_per_epoch,
    train_batch,
)


def test_mean_image_uses_training_split_only():
    c = default_data_config()
    c.name, c.validation_size, c.split_seed = "fashion_mnist_sample", 1000, 7
    ds = load_dataset(c)
    np.testing.assert_allclose(ds.stats.mean, ds.train_images.mean(0), rtol=0, atol=1e-4)
    assert ds.stats.mean.shape == (28, 28, 1)
    all_train = np.concatenate([ds.train_images, ds.validation_images])
    assert np.abs(ds.stats.mean - all_train.mean(0)).max() > 0.1  # validation excluded
    assert np.abs(ds.stats.mean - ds.test_images.mean(0)).max() > 0.1  # test excluded
    # The validation hold-out is seeded and stable.
    again = load_dataset(c)
    np.testing.assert_array_equal(again.validation_images, ds.validation_images)


def test_normalizations():
    x = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    pc = compute_stats(x, "per_channel")
    assert pc.mean.shape == (3,) and pc.std.shape == (3,)
    z = np.asarray(normalize(x, pc))
    np.testing.assert_allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.reshape(-1, 3).std(0), 1, atol=1e-4)
    mi = np.asarray(normalize(x, compute_stats(x, "mean_image")))
    np.testing.assert_allclose(mi.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(normalize(x, compute_stats(x, "none"))), x / 255.0)


def _distinct_images(n=16, h=6, w=5, c=2):
    # Strictly positive, all distinct values, so any zero must come from the padding.
    return jnp.arange(1, n * h * w * c + 1, dtype=jnp.float32).reshape(n, h, w, c)


def test_crops_stay_inside_padded_image():
    x, pad = _distinct_images(), 2
    out = np.asarray(augment(jax.random.key(0), x, pad=pad, flip=False))
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(out[i], padded[i, dy : dy + 6, dx : dx + 5])
        ]
        assert len(matches) == 1, f"image {i} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 3  # offsets vary across the batch


def test_flip_is_a_flip():
    x = _distinct_images(n=64)
    out = np.asarray(augment(jax.random.key(1), x, pad=0, flip=True))
    flipped = [np.array_equal(o, np.asarray(xi)[:, ::-1]) for o, xi in zip(out, x, strict=True)]
    same = [np.array_equal(o, np.asarray(xi)) for o, xi in zip(out, x, strict=True)]
    assert all(f != s for f, s in zip(flipped, same, strict=True))  # exactly one holds
    assert 10 < sum(flipped) < 54
    no_aug = augment(jax.random.key(1), x, pad=0, flip=False)
    np.testing.assert_array_equal(no_aug, x)


def test_same_key_same_batch_different_keys_differ():
    x = _distinct_images()
    a = augment(jax.random.key(5), x, pad=2, flip=True)
    b = augment(jax.random.key(5), x, pad=2, flip=True)
    c = augment(jax.random.key(6), x, pad=2, flip=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


N_TRAIN, BS = 40, 8  # 5 steps per epoch


@functools.lru_cache
def _jitted_train_batch(aug: AugmentConfig):
    return jax.jit(functools.partial(train_batch, batch_size=BS, aug=aug))


def _toy_train_set():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_TRAIN, 6, 6, 1), dtype=np.uint8)
    labels = np.arange(N_TRAIN, dtype=np.int32)  # label == index, so batches reveal the order
    return jnp.asarray(images), jnp.asarray(labels), compute_stats(images, "mean_image")


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    p1 = np.asarray(epoch_permutation(jax.random.key(3), 2, N_TRAIN))
    p2 = np.asarray(epoch_permutation(jax.random.key(3), 2, N_TRAIN))  # a fresh "loader"
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(np.sort(p1), np.arange(N_TRAIN))
    assert not np.array_equal(p1, np.asarray(epoch_permutation(jax.random.key(3), 3, N_TRAIN)))
    assert not np.array_equal(p1, np.asarray(epoch_permutation(jax.random.key(4), 2, N_TRAIN)))


def test_train_batches_cover_epochs_and_resume_exactly():
    images, labels, stats = _toy_train_set()
    aug = AugmentConfig(pad=2, crop=True, flip=True)
    fn = _jitted_train_batch(aug)
    key = jax.random.key(11)
    spe = steps_per_epoch(N_TRAIN, BS)
    run = [fn(images, labels, stats, key, jnp.int32(s)) for s in range(2 * spe + 2)]
    for e in range(2):  # each epoch visits every example exactly once, in the seeded order
        seen = np.concatenate([np.asarray(run[e * spe + i][1]) for i in range(spe)])
        np.testing.assert_array_equal(seen, np.asarray(epoch_permutation(key, e, N_TRAIN)))
    # A "resumed" run: fresh jit, starting at step k, gives the uninterrupted run's batches.
    resumed = jax.jit(functools.partial(train_batch, batch_size=BS, aug=aug))
    for k in (3, spe, 2 * spe + 1):
        x, y = resumed(images, labels, stats, jax.random.key(11), jnp.int32(k))
        np.testing.assert_array_equal(x, run[k][0])
        np.testing.assert_array_equal(y, run[k][1])
    assert x.dtype == jnp.float32 and x.shape == (BS, 6, 6, 1) and y.dtype == jnp.int32
    # Without augmentation the batch is exactly the normalised gathered images.
    plain = _jitted_train_batch(AugmentConfig(pad=0, crop=False, flip=False))
    x, y = plain(images, labels, stats, key, jnp.int32(7))
    idx = np.asarray(batch_indices(key, 7, N_TRAIN, BS))
    np.testing.assert_array_equal(np.asarray(y), idx)
    np.testing.assert_allclose(x, normalize(np.asarray(images)[idx], stats), rtol=1e-6)


@pytest.mark.parametrize("n,bs", [(37, 8), (16, 8), (3, 8)])
def test_eval_batches_cover_every_example_once(n, bs):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    labels = np.arange(n, dtype=np.int32)
    batches = list(eval_batches(images, labels, bs))
    assert len(batches) == -(-n // bs)
    assert all(x.shape == (bs, 1, 1, 1) and y.shape == (bs,) for x, y, _ in batches)
    counted = np.concatenate([y[m] for _, y, m in batches])
    np.testing.assert_array_equal(counted, labels)  # exactly N, in order, no duplicates
    assert sum(int(m.sum()) for *_, m in batches) == n


def test_shard_and_replicate_on_mesh():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    n_dev = len(jax.devices())
    x = np.arange(2 * n_dev * 3, dtype=np.float32).reshape(2 * n_dev, 3)
    xs, ys = shard_batch((x, np.arange(2 * n_dev)), mesh)
    assert xs.sharding == NamedSharding(mesh, P("data"))
    assert len(xs.addressable_shards) == n_dev and xs.addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(xs, x)
    rep = replicate(x, mesh)
    assert rep.sharding.is_fully_replicated
    np.testing.assert_array_equal(rep, x)


def test_train_batch_sharded_inside_jit():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    images, labels, stats = _toy_train_set()
    images, labels, stats = replicate((images, labels, stats), mesh)
    fn = jax.jit(
        functools.partial(
            train_batch,
            batch_size=BS,
            aug=AugmentConfig(),
            out_sharding=NamedSharding(mesh, P("data")),
        )
    )
    x, y = fn(images, labels, stats, jax.random.key(0), jnp.int32(1))
    assert x.sharding.spec == P("data") and x.shape == (BS, 6, 6, 1)
    unsharded = _jitted_train_batch(AugmentConfig())(
        *_toy_train_set(), jax.random.key(0), jnp.int32(1)
    )
    np.testing.assert_allclose(x, unsharded[0], rtol=1e-6)
    np.testing.assert_array_equal(y, unsharded[1])


def test_split_indices_stable_and_disjoint():
    tr, va = split_indices(100, 10, 0)
    tr2, va2 = split_indices(100, 10, 0)
    np.testing.assert_array_equal(va, va2)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 100
    assert len(split_indices(100, 0, 0)[1]) == 0
    with pytest.raises(ValueError, match="validation_size"):
        split_indices(100, 100, 0)


def test_normstats_is_a_pytree():
    s = NormStats(np.zeros(3, np.float32), np.ones(3, np.float32))
    assert len(jax.tree.leaves(s)) == 2
