"""Residual blocks: the paper's basic and bottleneck blocks, their plain twins, pre-activation (v2).

Every block takes `shortcut`:
  "A"    identity, strided subsampling and zero-padded channels where the shape changes (no params);
  "B"    identity where shapes match, 1x1 projection + BN where they change;
  "C"    1x1 projection + BN on every block;
  "none" no shortcut at all: the block of a *plain* network.

Each block records the response of each 3x3 layer after BN and before the addition/nonlinearity
(the quantity of the paper's Figure 7) as an `nnx.Intermediate` when `record_responses` is set.
"""

from __future__ import annotations

import jax
from flax import nnx

from resnet_jax.models.layers import LayerFactory, option_a_shortcut

SHORTCUTS = ("A", "B", "C", "none")


def check_shortcut(shortcut: str) -> str:
    """Returns `shortcut` if it names a known option, else raises a ValueError listing them."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut={shortcut!r} is not valid; choose one of {SHORTCUTS}.")
    return shortcut


class Projection(nnx.Module):
    """Option B/C shortcut: a strided 1x1 convolution followed by BN."""

    def __init__(self, layers: LayerFactory, in_f: int, out_f: int, strides: int, *, rngs):
        self.conv = layers.conv(in_f, out_f, 1, strides, rngs=rngs)
        self.norm = layers.norm(out_f, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class _Block(nnx.Module):
    """What all block types share: the shortcut, the activation and the response recording."""

    expansion = 1

    def _init_shared(self, layers, in_f, out_f, strides, shortcut, *, rngs) -> None:
        self.shortcut = check_shortcut(shortcut)
        changes_shape = strides != 1 or in_f != out_f
        if shortcut == "C" or (shortcut == "B" and changes_shape):
            self.projection = Projection(layers, in_f, out_f, strides, rngs=rngs)
        else:
            self.projection = None
        self.out_features = out_f
        self.strides = strides
        self.act = layers.act
        self.record_responses = False

    def _shortcut(self, x: jax.Array) -> jax.Array | None:
        if self.shortcut == "none":
            return None
        if self.projection is not None:
            return self.projection(x)
        return option_a_shortcut(x, self.out_features, self.strides)

    def _preact_residual(self, x: jax.Array, pre: jax.Array) -> jax.Array | None:
        # A projection sees the pre-activated input, as in the paper's reference code.
        if self.shortcut == "none":
            return None
        return self._shortcut(pre if self.projection is not None else x)

    def _record(self, name: str, y: jax.Array) -> jax.Array:
        if self.record_responses:
            self.sow(nnx.Intermediate, name, y)
        return y


class BasicBlock(_Block):
    """Two 3x3 convs, each followed by BN; ReLU after the addition (He et al. 2015, Fig. 2)."""

    def __init__(
        self,
        layers: LayerFactory,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        shortcut: str = "A",
        zero_init_last_bn: bool = False,
        rngs: nnx.Rngs,
    ):
        self.conv1 = layers.conv(in_features, features, 3, strides, rngs=rngs)
        self.bn1 = layers.norm(features, rngs=rngs)
        self.conv2 = layers.conv(features, features, 3, 1, rngs=rngs)
        self.bn2 = layers.norm(features, zero_init=zero_init_last_bn, rngs=rngs)
        self._init_shared(layers, in_features, features, strides, shortcut, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act(self._record("response1", self.bn1(self.conv1(x))))
        y = self._record("response2", self.bn2(self.conv2(y)))
        residual = self._shortcut(x)
        return self.act(y if residual is None else y + residual)


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3, 1x1 expand (x4); v1.5 places the stride on the 3x3 convolution."""

    expansion = 4

    def __init__(
        self,
        layers: LayerFactory,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        shortcut: str = "B",
        zero_init_last_bn: bool = False,
        rngs: nnx.Rngs,
    ):
        out = features * self.expansion
        self.conv1 = layers.conv(in_features, features, 1, 1, rngs=rngs)
        self.bn1 = layers.norm(features, rngs=rngs)
        self.conv2 = layers.conv(features, features, 3, strides, rngs=rngs)
        self.bn2 = layers.norm(features, rngs=rngs)
        self.conv3 = layers.conv(features, out, 1, 1, rngs=rngs)
        self.bn3 = layers.norm(out, zero_init=zero_init_last_bn, rngs=rngs)
        self._init_shared(layers, in_features, out, strides, shortcut, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self._record("response2", self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        residual = self._shortcut(x)
        return self.act(y if residual is None else y + residual)


class PreActBasicBlock(_Block):
    """Pre-activation basic block (He et al. 2016, arXiv:1603.05027): BN-ReLU-conv, twice."""

    def __init__(
        self,
        layers: LayerFactory,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        shortcut: str = "A",
        zero_init_last_bn: bool = False,
        rngs: nnx.Rngs,
    ):
        del zero_init_last_bn  # The last op of a pre-activation block is a conv, not a BN.
        self.bn1 = layers.norm(in_features, rngs=rngs)
        self.conv1 = layers.conv(in_features, features, 3, strides, rngs=rngs)
        self.bn2 = layers.norm(features, rngs=rngs)
        self.conv2 = layers.conv(features, features, 3, 1, rngs=rngs)
        self._init_shared(layers, in_features, features, strides, shortcut, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = self.act(self.bn1(x))
        residual = self._preact_residual(x, pre)
        y = self.conv1(pre)
        y = self.conv2(self.act(self._record("response1", self.bn2(y))))
        return y if residual is None else y + residual


class PreActBottleneckBlock(_Block):
    """Pre-activation bottleneck block: (BN-ReLU-conv) x 3 with 1x1, 3x3, 1x1 (x4) kernels."""

    expansion = 4

    def __init__(
        self,
        layers: LayerFactory,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        shortcut: str = "B",
        zero_init_last_bn: bool = False,
        rngs: nnx.Rngs,
    ):
        del zero_init_last_bn
        out = features * self.expansion
        self.bn1 = layers.norm(in_features, rngs=rngs)
        self.conv1 = layers.conv(in_features, features, 1, 1, rngs=rngs)
        self.bn2 = layers.norm(features, rngs=rngs)
        self.conv2 = layers.conv(features, features, 3, strides, rngs=rngs)
        self.bn3 = layers.norm(features, rngs=rngs)
        self.conv3 = layers.conv(features, out, 1, 1, rngs=rngs)
        self._init_shared(layers, in_features, out, strides, shortcut, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = self.act(self.bn1(x))
        residual = self._preact_residual(x, pre)
        y = self.conv1(pre)
        y = self.conv2(self.act(self.bn2(y)))
        y = self.conv3(self.act(self._record("response2", self.bn3(y))))
        return y if residual is None else y + residual
