"""BatchNorm with a closed-form backward pass (CPU); the parameters and maths of nnx.BatchNorm.

In training mode BN's output depends on the batch through its mean and variance. Automatic
differentiation of `nnx.BatchNorm` follows those dependencies one by one (three reductions per layer
on XLA:CPU); the textbook closed form needs two, `sum(g)` and `sum(g * xhat)`:

    dx = scale / sigma * (g - sum(g) / n - xhat * sum(g * xhat) / n)

It is the same gradient (tests/test_speed.py checks it against autodiff of nnx.BatchNorm), with
fewer passes over the activations, which is what costs on a CPU.

`sum(g * xhat)` is computed as `inv * (sum(g * x) - mean * sum(g))`: then no reduction reads
`xhat`, so XLA stops computing and storing `xhat` in the forward pass (it did, to feed the
reduction: one extra write and read of every BN input; the train step ran 1.03-1.17x faster
on CPU in paired A/B runs, docs/performance.md). The subtraction cancels no more than the
forward pass's `E[x^2] - E[x]^2` (nnx's `use_fast_variance`); tests check it at |mean| = 10 and
100 sigma.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalize(x: jax.Array, mean: jax.Array, inv: jax.Array, scale: jax.Array, bias: jax.Array,
              axes: tuple[int, ...]) -> jax.Array:
    """`(x - mean) * inv * scale + bias` where mean and inv = 1/sigma are x's batch statistics.

    Its VJP treats mean and inv as functions of x (the full BN gradient flows to x); they must be
    the statistics of x over `axes`, as `BatchNorm` computes them.
    """
    y = (x.astype(jnp.float32) - mean) * (inv * scale) + bias
    return y.astype(x.dtype)


def _normalize_fwd(x, mean, inv, scale, bias, axes):
    return normalize(x, mean, inv, scale, bias, axes), (x, mean, inv, scale)


def _normalize_bwd(axes, res, g):
    x, mean, inv, scale = res
    n = 1
    for a in axes:
        n *= x.shape[a]
    g = g.astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    dbias = jnp.sum(g, axes)
    # = sum(g * xhat), without a reduction over xhat (module docstring: why).
    dscale = inv * (jnp.sum(g * x32, axes) - mean * dbias)
    xhat = (x32 - mean) * inv
    dx = (scale * inv) * (g - dbias / n - xhat * (dscale / n))
    # mean and inv carry no gradient of their own: their effect on x's gradient is in dx.
    return dx.astype(x.dtype), jnp.zeros_like(mean), jnp.zeros_like(inv), dscale, dbias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` (same constructor, variables and checkpoints) with the closed-form VJP.

    Training mode over the last axis uses `normalize`; anything else (running averages, masks,
    cross-device `axis_name`, other axes, no scale or bias) is `nnx.BatchNorm` unchanged.
    Statistics are computed in float32 whatever the compute dtype, as in `nnx.BatchNorm`.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        running = self.use_running_average if use_running_average is None else use_running_average
        plain = (self.axis in (-1, x.ndim - 1) and mask is None and self.axis_name is None
                 and self.scale is not None and self.bias is not None and self.use_fast_variance)
        if running or not plain:
            return super().__call__(x, use_running_average, mask=mask)
        axes = tuple(range(x.ndim - 1))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axes)
        var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * mean
        self.var[...] = m * self.var[...] + (1 - m) * var
        y = normalize(x, mean, jax.lax.rsqrt(var + self.epsilon), self.scale[...],
                      self.bias[...], axes)
        return y.astype(self.dtype or x.dtype)
