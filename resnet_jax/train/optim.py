"""Optax optimisers and learning-rate schedules from the `optim` config section."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def base_learning_rate(optim: ml_collections.ConfigDict, batch_size: int) -> float:
    """The peak rate, linearly scaled with batch size when `scale_with_batch` (Goyal et al.)."""
    lr = optim.learning_rate
    if optim.scale_with_batch:
        lr *= batch_size / optim.reference_batch_size
    return lr


def make_schedule(optim: ml_collections.ConfigDict, batch_size: int, num_steps: int):
    """The learning rate as a function of the step count.

    piecewise: the paper's constant rate multiplied by `decay_factor` at each boundary (optax's
    piecewise_constant_schedule applies a boundary's scale from that step on: step 32000 runs at
    0.01); cosine: decay to 0 at `num_steps`; constant. A warm-up, `constant` (ResNet-110's 0.01
    for 400 steps) or `linear` (from 0), replaces the first `warmup_steps` of the main schedule,
    whose clock counts from step 0 of the run, as the paper's 32k/48k boundaries do.
    """
    lr = base_learning_rate(optim, batch_size)
    if optim.schedule == "piecewise":
        main = optax.piecewise_constant_schedule(
            lr, {int(b): optim.decay_factor for b in optim.boundaries}
        )
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, num_steps)
    else:
        main = optax.constant_schedule(lr)
    warm = optim.warmup_steps if optim.warmup != "none" else 0
    if not warm:
        return main
    if optim.warmup == "constant":
        first = optax.constant_schedule(optim.warmup_learning_rate)
    else:
        first = optax.linear_schedule(0.0, lr, warm)
    return lambda count: jnp.where(count < warm, first(count), main(count))


def weight_decay_mask(params):
    """True for the leaves that get weight decay when BN scales/biases and biases are excluded."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(
    optim: ml_collections.ConfigDict, batch_size: int, num_steps: int
) -> optax.GradientTransformation:
    """SGD (momentum, optional Nesterov), Adam or AdamW, with the paper's L2 weight decay.

    For SGD and Adam, decay is added to the gradient before the update (L2 regularisation, the
    paper's and PyTorch's `weight_decay`); AdamW decouples it. Clipping, if set, comes first.
    """
    schedule = make_schedule(optim, batch_size, num_steps)
    mask = None if optim.decay_bn_and_bias else weight_decay_mask
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    if optim.name == "adamw":
        parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                                 weight_decay=optim.weight_decay, mask=mask))
        return optax.chain(*parts)
    if optim.weight_decay > 0:
        parts.append(optax.add_decayed_weights(optim.weight_decay, mask))
    if optim.name == "sgd":
        parts.append(optax.sgd(schedule, momentum=optim.momentum or None,
                               nesterov=optim.nesterov))
    else:
        parts.append(optax.adam(schedule, b1=optim.b1, b2=optim.b2))
    return optax.chain(*parts)
