"""The layers every block is built from, handed to blocks as one `LayerFactory`.

Blocks receive their layers from a factory (the Flax ImageNet example's `ModuleDef` habit), so a
fork that swaps BatchNorm for GroupNorm, or the initialiser, changes one line here. The factory is
also the one seam through which a backend speeds a network up (`resnet_jax.backends`): a backend
is a subclass that returns faster modules with the same parameters and the same NHWC contract.
A block that builds its layers with `conv`, `norm` and `act` gets every backend's speed; a block
that uses its own modules still runs under every backend, just without the speed-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

# He et al. 2015 ("Delving deep into rectifiers"): zero-mean Gaussian, std = sqrt(2 / fan_in).
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class LayerFactory:
    """Builds the convolutions, norms and activations of one network (NHWC, stock Flax NNX).

    Attributes:
      dtype: compute dtype (float32 or bfloat16); parameters stay float32.
      bn_momentum: running-average decay of BN statistics (Flax convention: 0.9 == PyTorch's 0.1).
      bn_epsilon: BN epsilon.
      norm_cls: the normalisation module class; None means the factory's BatchNorm
        (`batch_norm_cls`). Any class with nnx.BatchNorm's constructor works (GroupNorm via a
        partial, ghost BN...).
    """

    # The module classes a backend may replace with faster ones of the same parameters.
    conv_cls: ClassVar[type[nnx.Conv]] = nnx.Conv
    batch_norm_cls: ClassVar[Callable[..., nnx.Module]] = nnx.BatchNorm

    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    norm_cls: Callable[..., nnx.Module] | None = None

    def conv(
        self, in_features: int, out_features: int, kernel: int, strides: int, *, rngs: nnx.Rngs
    ) -> nnx.Module:
        """A bias-free square convolution (a BN always follows, so a bias would be redundant)."""
        # Explicit symmetric padding: 'SAME' pads stride-2 convs asymmetrically, unlike the paper.
        pad = (kernel - 1) // 2
        return self.conv_cls(
            in_features,
            out_features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=he_normal,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def norm(self, features: int, *, zero_init: bool = False, rngs: nnx.Rngs) -> nnx.Module:
        """BatchNorm over channels; `zero_init` sets its scale to 0 (Goyal et al. 2017)."""
        return (self.norm_cls or self.batch_norm_cls)(
            features,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
            rngs=rngs,
        )

    def act(self, x: jax.Array) -> jax.Array:
        """The nonlinearity: ReLU."""
        return nnx.relu(x)


def option_a_shortcut(x: jax.Array, out_features: int, strides: int) -> jax.Array:
    """He et al. 2015's option A shortcut: identity, subsampled by `strides`, zero-padded channels.

    It adds no parameters, which is why a residual net and its plain twin have equal size. The new
    channels are appended after the identity channels.
    """
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = out_features - x.shape[-1]
    if extra > 0:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x
