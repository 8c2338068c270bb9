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

from resnet_jax.kernels import onednn_conv
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


def cpu_conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
    """`conv_general_dilated` (canonical backward) when tracing for CPU, else plain lax.

    GPU and TPU compilers rewrite any convolution into their libraries' layouts themselves, so
    the explicit transposes of `canonical_conv2d` would only be extra work there.
    """
    if jax.default_backend() == "cpu":
        return conv_general_dilated(*args, **kwargs)
    return jax.lax.conv_general_dilated(*args, **kwargs)


class Conv(nnx.Conv):
    """`nnx.Conv` (same parameters and checkpoints) that also takes oneDNN's blocked layout.

    A 5-D input is a batch of activations in the layout `(N, C/8, H, W, 8)` that a ResNet uses
    with `conv_impl="onednn"` (`resnet_jax.kernels.onednn_conv`): oneDNN convolves it directly.
    Anything else is `nnx.Conv` unchanged.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim != 5:
            return super().__call__(inputs)
        return onednn_conv.conv2d(inputs, self.kernel[...], self._stride(), self._padding())

    def image_to_blocked(self, images: jax.Array) -> jax.Array:
        """The first layer on NHWC images, returning blocked activations (oneDNN path)."""
        return onednn_conv.conv2d(images.transpose(0, 3, 1, 2), self.kernel[...],
                                  self._stride(), self._padding())

    def _stride(self) -> int:
        strides = self.strides if isinstance(self.strides, Sequence) else (self.strides,) * 2
        if len(set(strides)) != 1:
            raise ValueError(f"oneDNN path: unequal strides {strides} are not supported")
        return int(strides[0])

    def _padding(self) -> tuple[int, int, int, int]:
        if isinstance(self.padding, str):
            raise ValueError(f"oneDNN path: padding={self.padding!r}; give explicit pads")
        (pt, pb), (pl, pr) = self.padding
        return (pt, pb, pl, pr)


@dataclasses.dataclass(frozen=True)
class LayerFactory:
    """Builds the convolutions and norms of one network with shared dtype and BN settings.

    Attributes:
      dtype: compute dtype (float32 or bfloat16); parameters stay float32.
      bn_momentum: running-average decay of BN statistics (Flax convention: 0.9 == PyTorch's 0.1).
      bn_epsilon: BN epsilon.
      norm_cls: the normalisation module class (`batch_norm.BatchNorm`, i.e. nnx.BatchNorm
        with a closed-form backward pass, by default).
      canonical_conv: use `canonical_conv2d` (explicit-layout backward pass, sub-pixel input
        gradient for strided convolutions). None (default): on when tracing for CPU, where scanned
        stages need it (lax's own backward falls to a naive loop inside `scan`) and strided
        convolutions' input gradients run ~3x faster with it; True / False force it.
    """

    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    norm_cls: Callable[..., nnx.Module] = BatchNorm
    canonical_conv: bool | None = None

    def conv(
        self, in_features: int, out_features: int, kernel: int, strides: int, *, rngs: nnx.Rngs
    ) -> Conv:
        """A bias-free convolution (a BN always follows, so a bias would be redundant)."""
        # Explicit symmetric padding: 'SAME' pads stride-2 convs asymmetrically, unlike the paper.
        pad = (kernel - 1) // 2
        return Conv(
            in_features,
            out_features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=he_normal,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            conv_general_dilated={None: cpu_conv_general_dilated, True: conv_general_dilated,
                                  False: jax.lax.conv_general_dilated}[self.canonical_conv],
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
    `x` is NHWC, or blocked (N, C/8, H, W, 8) on the oneDNN path: the new channels are then
    whole blocks of zeros, in the same order.
    """
    if x.ndim == 5:
        if strides > 1:
            x = x[:, :, ::strides, ::strides, :]
        extra = out_features - x.shape[1] * x.shape[-1]
        if extra > 0:
            x = jnp.pad(x, ((0, 0), (0, extra // x.shape[-1]), (0, 0), (0, 0), (0, 0)))
        return x
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = out_features - x.shape[-1]
    if extra > 0:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x
