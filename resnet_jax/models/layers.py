"""Layer factories shared by every block: He-initialised convolutions and BatchNorm.

Blocks receive their layers as factories (the Flax ImageNet example's `ModuleDef` habit), so a fork
that swaps BatchNorm for GroupNorm, or the initialiser, changes one line here or one argument.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax.models.batch_norm import BatchNorm

# He et al. 2015 ("Delving deep into rectifiers"): zero-mean Gaussian, std = sqrt(2 / fan_in).
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv2d(x: jax.Array, k: jax.Array, stride: int, pad: tuple[int, int, int, int]) -> jax.Array:
    (pt, pb, pl, pr) = pad
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pt, pb), (pl, pr)),
                                        dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv2d(x: jax.Array, k: jax.Array, stride: int, pad: tuple[int, int, int, int]):
    """NHWC/HWIO 2-D convolution whose backward pass is two NHWC/HWIO convolutions too.

    Why: JAX's automatic transpose rules express the input and weight gradients as convolutions
    with permuted dimension labels (e.g. `f01b_i01o->01bf`). XLA:CPU runs those fast only when its
    layout assignment can insert transposes around them; inside a `scan` (a while loop with fixed
    buffer layouts) it cannot, and they fall back to a naive loop, ~100x slower. Here the
    permutations are explicit (cheap transposes of activations / 3x3 kernels), so every
    convolution is in the one canonical form, scanned or not. Same maths as `lax.conv`.
    """
    return _conv2d(x, k, stride, pad)


def _canonical_fwd(x, k, stride, pad):
    return _conv2d(x, k, stride, pad), (x, k)


def _canonical_bwd(stride, pad, res, dy):
    x, k = res
    (pt, pb, pl, pr) = pad
    kh, kw = k.shape[0], k.shape[1]
    h, w = x.shape[1], x.shape[2]
    # Input gradient: full correlation of the (stride-dilated) output gradient with the kernel
    # flipped in space and with in/out channels swapped. The high padding absorbs the rows and
    # columns a strided forward pass never read.
    kt = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
    ho, wo = dy.shape[1], dy.shape[2]
    extra_h = h + pt + pb - ((ho - 1) * stride + kh)
    extra_w = w + pl + pr - ((wo - 1) * stride + kw)
    dx = jax.lax.conv_general_dilated(
        dy, kt, (1, 1),
        ((kh - 1 - pt, kh - 1 - pb + extra_h), (kw - 1 - pl, kw - 1 - pr + extra_w)),
        lhs_dilation=(stride, stride), dimension_numbers=_NHWC,
    )
    # Weight gradient: channels of x act as the batch and the batch as the features, so this
    # too is a canonical NHWC/HWIO convolution: [I,H,W,B] * [H',W',B,O] -> [I,kh,kw,O].
    dk = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), ((pt, pb), (pl, pr)),
        rhs_dilation=(stride, stride), dimension_numbers=_NHWC,
    )
    dk = dk[:, :kh, :kw, :].transpose(1, 2, 0, 3).astype(k.dtype)
    return dx.astype(x.dtype), dk


canonical_conv2d.defvjp(_canonical_fwd, _canonical_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` (nnx.Conv's hook) using `canonical_conv2d`.

    Only plain 2-D NHWC/HWIO convolutions with equal strides and explicit padding take the
    canonical path; anything else (dilation, groups, 'SAME' strings) goes to lax unchanged.
    """
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    simple = (
        lhs.ndim == 4
        and dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and not isinstance(padding, str)
        and len(set(window_strides)) == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and precision is None
        and not kwargs
    )
    if not simple:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs)
    (pt, pb), (pl, pr) = padding
    return canonical_conv2d(lhs, rhs, int(window_strides[0]), (pt, pb, pl, pr))


@dataclasses.dataclass(frozen=True)
class LayerFactory:
    """Builds the convolutions and norms of one network with shared dtype and BN settings.

    Attributes:
      dtype: compute dtype (float32 or bfloat16); parameters stay float32.
      bn_momentum: running-average decay of BN statistics (Flax convention: 0.9 == PyTorch's 0.1).
      bn_epsilon: BN epsilon.
      norm_cls: the normalisation module class (`batch_norm.BatchNorm`, i.e. nnx.BatchNorm
        with a closed-form backward pass, by default).
      canonical_conv: use `canonical_conv2d` (explicit-layout backward pass). Scanned stages need
        it on XLA:CPU; unrolled nets measured no faster with it, so they keep lax's own.
    """

    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    norm_cls: Callable[..., nnx.Module] = BatchNorm
    canonical_conv: bool = False

    def conv(
        self, in_features: int, out_features: int, kernel: int, strides: int, *, rngs: nnx.Rngs
    ) -> nnx.Conv:
        """A bias-free convolution (a BN always follows, so a bias would be redundant)."""
        # Explicit symmetric padding: 'SAME' pads stride-2 convs asymmetrically, unlike the paper.
        pad = (kernel - 1) // 2
        return nnx.Conv(
            in_features,
            out_features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=he_normal,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            conv_general_dilated=(conv_general_dilated if self.canonical_conv
                                  else jax.lax.conv_general_dilated),
            rngs=rngs,
        )

    def norm(self, features: int, *, zero_init: bool = False, rngs: nnx.Rngs) -> nnx.Module:
        """BatchNorm over channels; `zero_init` sets its scale to 0 (Goyal et al. 2017)."""
        return self.norm_cls(
            features,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
            rngs=rngs,
        )


def materialize(x: jax.Array) -> jax.Array:
    """Identity on `x` (bitwise, in value and gradient) that XLA computes once and stores.

    Why: a block's output is a chain of cheap elementwise ops (BN, add, ReLU) over convolution
    outputs, and XLA:CPU's fusion copies such chains into every consumer. The backward pass reads
    each convolution input transposed (for the weight gradient), so without this each of those
    transposes recomputed the whole residual stream back to the start of its stage, reading it in
    transposed order: on ResNet-20 those fusions took ~60% of the train step, and more with depth
    (docs/performance.md). Dividing by a one that XLA cannot see through (it is hidden behind an
    optimization barrier, which XLA:CPU otherwise drops before fusion) marks the value as too
    expensive to duplicate, so it is materialised once and the transposes become plain copies.
    The division by exactly 1 changes no bit; on GPU/TPU it is one fused elementwise op.
    """
    return x / jax.lax.optimization_barrier(jnp.ones((), x.dtype))


def option_a_shortcut(x: jax.Array, out_features: int, strides: int) -> jax.Array:
    """He et al. 2015's option A shortcut: identity, subsampled by `strides`, zero-padded channels.

    It adds no parameters, which is why a residual net and its plain twin have equal size.
    """
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = out_features - x.shape[-1]
    if extra > 0:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x
