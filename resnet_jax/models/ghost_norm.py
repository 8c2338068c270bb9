"""Ghost BatchNorm: training statistics from groups of `group_size` examples.

The paper's BatchNorm saw 64 images per GPU (batch 128 on two GPUs); with global statistics over
a sharded batch every BN sees all 128. `group_size=64` restores the paper's setting on any number
of devices. Parameter and statistic names match `nnx.BatchNorm`, so checkpoints interchange.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class GhostBatchNorm(nnx.Module):
    """BatchNorm over the channel axis with per-group batch statistics in training mode."""

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init=nnx.initializers.ones,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ):
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be >= 1.")
        self.group_size = group_size
        self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
        self.use_running_average = use_running_average
        self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        if self.use_running_average:
            inv = jax.lax.rsqrt(self.var[...] + self.epsilon)
            y = (x.astype(jnp.float32) - self.mean[...]) * inv
        else:
            batch = x.shape[0]
            if batch % self.group_size:
                raise ValueError(
                    f"Ghost BatchNorm: batch {batch} is not a multiple of group_size "
                    f"{self.group_size}."
                )
            groups = x.astype(jnp.float32).reshape(batch // self.group_size, self.group_size,
                                                   *x.shape[1:])
            axes = tuple(range(1, groups.ndim - 1))
            mean = groups.mean(axes, keepdims=True)
            var = groups.var(axes, keepdims=True)
            y = ((groups - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            # Running statistics average the groups' statistics, as per-device BN would.
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * mean.mean(0).reshape(-1)
            self.var[...] = m * self.var[...] + (1 - m) * var.mean(0).reshape(-1)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)
