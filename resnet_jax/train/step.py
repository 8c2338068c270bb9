"""The pure, jitted core: one training step, a block of steps, an evaluation step.

Sharding: the batch is split over the mesh's "data" axis and the state is replicated, so XLA's
SPMD partitioner inserts the cross-device gradient mean and computes BatchNorm statistics over
the global batch. The same function runs on 1 device, 8 simulated CPU devices or a TPU slice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.data import AugmentConfig, NormStats, augment, data_keys, normalize, train_batch
from resnet_jax.train.state import TrainState

# Dynamic loss scaling (float16): halve on overflow, double after this many finite steps.
LOSS_SCALE_PERIOD = 2000


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static inputs of the train step."""

    batch_size: int
    aug: AugmentConfig
    dynamic_loss_scale: bool = False
    # The batch arrives with the data (streaming pipeline) instead of being gathered on the
    # devices from the resident training split.
    streamed: bool = False


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _select(pred: jax.Array, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def streamed_batch(images_u8: jax.Array, labels: jax.Array, stats: NormStats, key: jax.Array,
                   step: jax.Array, aug: AugmentConfig, sharding: NamedSharding
                   ) -> tuple[jax.Array, jax.Array]:
    """A streamed uint8 batch normalised and, where `aug` asks, padded, cropped and flipped on
    the device with the resident pipeline's key for `step`."""
    x = normalize(jax.lax.with_sharding_constraint(images_u8, sharding), stats)
    if aug.flip or (aug.crop and aug.pad > 0):
        _, aug_key = data_keys(key)
        x = augment(jax.random.fold_in(aug_key, step), x, pad=aug.pad, flip=aug.flip,
                    crop=aug.crop)
    return x, labels.astype(jnp.int32)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: Callable,
                    cfg: StepConfig, mesh: Mesh) -> Callable:
    """Returns the pure `train_step(state, data) -> (state, metrics)`.

    `data` is `(images_u8, labels, stats)`: the whole training split, resident on the devices,
    or with `cfg.streamed` this step's uint8 batch and its labels. Either way the batch of step
    s is a pure function of (seed, s), so a resumed run sees the same batches. A step whose loss
    or gradients are not finite is skipped (state kept, counter raised).
    """
    batch_sharding = NamedSharding(mesh, P("data"))

    def loss_fn(params, batch_stats, x, y, scale):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return loss * scale, (loss, logits, new_stats)

    def train_step(state: TrainState, data) -> tuple[TrainState, dict]:
        images, labels, stats = data
        key = jax.random.wrap_key_data(state.rng)
        if cfg.streamed:
            x, y = streamed_batch(images, labels, stats, key, state.step, cfg.aug,
                                  batch_sharding)
        else:
            x, y = train_batch(images, labels, stats, key, state.step, cfg.batch_size, cfg.aug,
                               out_sharding=batch_sharding)
        grads, (loss, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, y, state.loss_scale
        )
        grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss_scale, good = state.loss_scale, state.good_steps + 1
        if cfg.dynamic_loss_scale:
            grow = good >= LOSS_SCALE_PERIOD
            loss_scale = jnp.where(finite, jnp.where(grow, loss_scale * 2, loss_scale),
                                   loss_scale / 2)
            good = jnp.where(finite & ~grow, good, 0)
        new_state = state.replace(
            step=state.step + 1,
            params=_select(finite, params, state.params),
            batch_stats=_select(finite, new_stats, state.batch_stats),
            opt_state=_select(finite, opt_state, state.opt_state),
            loss_scale=loss_scale,
            good_steps=good,
            nonfinite_consecutive=jnp.where(finite, 0, state.nonfinite_consecutive + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "error": 100.0 * jnp.mean(jnp.argmax(logits, -1) != y),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "finite": finite,
        }
        return new_state, metrics

    return train_step


def make_multi_step(train_step: Callable, num_steps: int, streamed: bool = False) -> Callable:
    """`num_steps` train steps in one call (`lax.scan`), so dispatch never dominates small nets.

    Metrics come back stacked along a leading axis of length `num_steps`. `streamed`: `data` is
    `(images [num_steps, B, ...], labels [num_steps, B], stats)`, one batch per step.
    """
    if streamed:
        def streamed_steps(state, data):
            images, labels, stats = data
            return jax.lax.scan(lambda s, batch: train_step(s, (*batch, stats)), state,
                                (images, labels), length=num_steps)

        return streamed_steps
    if num_steps == 1:
        return functools.partial(_one, train_step)

    def steps(state, data):
        return jax.lax.scan(lambda s, _: train_step(s, data), state, None, length=num_steps)

    return steps


def _one(train_step, state, data):
    state, metrics = train_step(state, data)
    return state, jax.tree.map(lambda m: m[None], metrics)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """Returns `eval_step(state, x_u8, y, mask, stats) -> sums` over the unmasked examples.

    Sums (not means) so batches add up exactly: loss, top-1 and top-5 errors, count, and the
    per-class counts for a confusion matrix are left to `evaluate`'s caller via `logits`.
    """

    def eval_step(state: TrainState, x_u8, y, mask, stats: NormStats) -> dict:
        model = nnx.merge(graphdef, state.params, state.batch_stats)
        logits = model(normalize(x_u8, stats))
        w = mask.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        k = min(5, logits.shape[-1])
        top5 = jnp.any(jax.lax.top_k(logits, k)[1] == y[:, None], axis=-1)
        return {
            "loss_sum": jnp.sum(loss * w),
            "wrong1": jnp.sum((jnp.argmax(logits, -1) != y) * w),
            "wrong5": jnp.sum((~top5) * w),
            "count": jnp.sum(w),
            "logits": logits,
        }

    return eval_step
