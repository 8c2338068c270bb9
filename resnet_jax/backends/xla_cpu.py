"""XLA:CPU backend: the stock layers with three changes that make XLA's CPU code fast.

- `canonical_conv2d`: a convolution whose backward pass is written as NHWC/HWIO convolutions with
  explicit transposes, and a sub-pixel input gradient for strided convolutions;
- `BatchNorm` with a closed-form backward pass (`resnet_jax.backends.batch_norm`);
- `materialize` after every activation, a fusion barrier that stops XLA:CPU from recomputing the
  residual stream inside each transposed read.

Same parameters, same values to float32 rounding, same NHWC contract as `LayerFactory`; the
measurements behind each change are in docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax.backends.batch_norm import BatchNorm
from resnet_jax.models.layers import LayerFactory

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


def _phase_taps(k: int, stride: int, pad_lo: int) -> list[list[tuple[int, int]]]:
    """Per output phase p < stride: the (offset d, tap t) pairs with dx[s*a+p] += dy[a+d] @ w[t].

    From the forward y[b] = sum_t x[s*b + t - pad_lo] w[t]: x[i] with i = s*a + p receives
    dy[b] w[t] for every t = s*q + r, r = (p + pad_lo) mod s, at b = a + (p + pad_lo) // s - q.
    """
    taps = []
    for p in range(stride):
        m, r = divmod(p + pad_lo, stride)
        taps.append([(m - q, stride * q + r) for q in range(-(-(k - r) // stride))])
    return taps


def _window(start: int, length: int, size: int) -> tuple[int, int, int, int]:
    """Rows start .. start+length-1 of an axis of `size`: (slice lo, slice hi, pad lo, pad hi)."""
    lo, hi = max(start, 0), min(start + length, size)
    return lo, max(hi, lo), max(-start, 0), length - max(hi - lo, 0) - max(-start, 0)


def strided_input_grad(dy: jax.Array, k: jax.Array, stride: int, pad: tuple[int, int, int, int],
                       in_hw: tuple[int, int]) -> jax.Array:
    """Input gradient of a strided NHWC/HWIO convolution, without a zero-dilated `dy`.

    The textbook form convolves `dy` dilated with stride-1 zeros between pixels, so a stride-2
    convolution's input gradient does 4x the useful work (XLA:CPU: 22 ms where 6 ms suffice for
    the first stride-2 convolution of a CIFAR ResNet). Here each of the stride**2 output phases
    (sub-pixel positions) is a small stride-1 correlation of `dy` with a subset of the kernel
    taps; all phases come out of one convolution as stacked output channels and are interleaved
    back into place (depth-to-space).
    """
    pt, _, pl, _ = pad
    kh, kw, ci, co = k.shape
    s = stride
    taps_h, taps_w = _phase_taps(kh, s, pt), _phase_taps(kw, s, pl)
    offs_h = [d for phase in taps_h for d, _ in phase]
    offs_w = [d for phase in taps_w for d, _ in phase]
    h0, h1, w0, w1 = min(offs_h), max(offs_h), min(offs_w), max(offs_w)
    # Phase kernel [offset_h, offset_w, co, (phase_h, phase_w, ci)]; taps a phase lacks stay 0.
    n_taps = (h1 - h0 + 1) * (w1 - w0 + 1)
    blocks = [[jnp.zeros((co, ci), k.dtype)] * (s * s) for _ in range(n_taps)]
    for ph in range(s):
        for pw in range(s):
            for dh, th in taps_h[ph]:
                for dw, tw in taps_w[pw]:
                    blocks[(dh - h0) * (w1 - w0 + 1) + (dw - w0)][ph * s + pw] = k[th, tw].T
    kernel = jnp.stack([jnp.stack(b, axis=1) for b in blocks])  # [taps, co, s*s, ci]
    kernel = kernel.reshape(h1 - h0 + 1, w1 - w0 + 1, co, s * s * ci)
    h, w = in_hw
    a, b = -(-h // s), -(-w // s)  # positions per phase (the last may overhang: cropped below)
    # Phase position i reads dy rows i + h0 .. i + h1: take dy rows h0 .. a - 1 + h1, zero
    # outside dy (explicit slicing: XLA:CPU mishandles negative convolution padding).
    rows, cols = _window(h0, a + h1 - h0, dy.shape[1]), _window(w0, b + w1 - w0, dy.shape[2])
    dy = dy[:, rows[0]:rows[1], cols[0]:cols[1], :]
    phases = jax.lax.conv_general_dilated(
        dy, kernel, (1, 1), (rows[2:], cols[2:]), dimension_numbers=_NHWC)
    n = dy.shape[0]
    dx = phases.reshape(n, a, b, s, s, ci).transpose(0, 1, 3, 2, 4, 5).reshape(n, a * s, b * s, ci)
    return dx[:, :h, :w, :]


def _canonical_bwd(stride, pad, res, dy):
    x, k = res
    (pt, pb, pl, pr) = pad
    kh, kw = k.shape[0], k.shape[1]
    h, w = x.shape[1], x.shape[2]
    if stride > 1:
        dx = strided_input_grad(dy, k, stride, pad, (h, w))
    else:
        # Input gradient: full correlation of the output gradient with the kernel flipped in
        # space and with in/out channels swapped.
        kt = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
        dx = jax.lax.conv_general_dilated(
            dy, kt, (1, 1), ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)),
            dimension_numbers=_NHWC,
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
    # nnx.Conv always passes `out_sharding` (None unless set); None arguments change nothing.
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
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


@dataclasses.dataclass(frozen=True)
class XlaCpuLayers(LayerFactory):
    """`LayerFactory` with XLA:CPU's fast paths: canonical convolutions, closed-form BN,
    fusion barriers after activations. Any backend runs it; it only pays off on CPU."""

    batch_norm_cls: ClassVar[Callable[..., nnx.Module]] = BatchNorm

    def conv(self, in_features: int, out_features: int, kernel: int, strides: int, *,
             rngs: nnx.Rngs) -> nnx.Module:
        """`LayerFactory.conv` whose convolution is `canonical_conv2d` (same parameters)."""
        conv = super().conv(in_features, out_features, kernel, strides, rngs=rngs)
        conv.conv_general_dilated = conv_general_dilated
        return conv

    def act(self, x: jax.Array) -> jax.Array:
        """ReLU, stored once (`materialize`) rather than recomputed by every consumer."""
        return materialize(nnx.relu(x))
