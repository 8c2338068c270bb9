"""ResNet as stem -> stages -> head, with residual *stages* as modules.

A stage is the paper's unit: `num_blocks` blocks at one width, the first of which may subsample
(stride 2 at the first layer of stages 2 and 3 in the CIFAR nets). The blocks after the first are
identical in shape, so a stage can run them as one `nnx.scan` over stacked parameters
(`scan_blocks=True`): compile time then stays flat in depth (ResNet-1202 compiles like ResNet-20).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax.models.ghost_norm import GhostBatchNorm
from resnet_jax.models.layers import LayerFactory


class Stage(nnx.Module):
    """`num_blocks` blocks of one width; the first may subsample and widen, the rest repeat."""

    def __init__(
        self,
        block_cls: type[nnx.Module],
        layers: LayerFactory,
        in_features: int,
        features: int,
        num_blocks: int,
        strides: int,
        *,
        shortcut: str,
        zero_init_last_bn: bool = False,
        scan_blocks: bool = False,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(shortcut=shortcut, zero_init_last_bn=zero_init_last_bn)
        self.first = block_cls(layers, in_features, features, strides, rngs=rngs, **kwargs)
        out = features * block_cls.expansion
        self.scan_blocks = scan_blocks and num_blocks > 1
        self.remat = remat
        if self.scan_blocks:

            @nnx.split_rngs(splits=num_blocks - 1)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_stacked(rngs: nnx.Rngs) -> nnx.Module:
                return block_cls(layers, out, features, 1, rngs=rngs, **kwargs)

            self.rest = make_stacked(rngs)
        else:
            self.rest = nnx.List(
                [block_cls(layers, out, features, 1, rngs=rngs, **kwargs)
                 for _ in range(num_blocks - 1)]
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.first(x)
        if self.scan_blocks:

            def apply(block: nnx.Module, x: jax.Array) -> jax.Array:
                return block(x)

            if self.remat:
                apply = nnx.remat(apply)

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x: jax.Array, block: nnx.Module) -> jax.Array:
                return apply(block, x)

            return run(x, self.rest)
        for block in self.rest:
            x = nnx.remat(lambda b, y: b(y))(block, x) if self.remat else block(x)
        return x


class ResNet(nnx.Module):
    """A residual (or plain) network: stem, stages, global average pool, dense classifier.

    Call `model(x)` for logits, or `model(x, return_features=True)` for `(logits, features)` where
    `features` maps "stem", "stage1".. and "pooled" to activations (NHWC), for probing.

    `layer_factory` builds every convolution, norm and activation (default: stock Flax NNX
    layers); a backend (`resnet_jax.backends`) passes a subclass with faster layers of the same
    parameters, so checkpoints do not depend on it.
    """

    def __init__(
        self,
        *,
        block_cls: type[nnx.Module],
        stage_sizes: Sequence[int],
        stage_widths: Sequence[int],
        stem: str = "cifar",
        stem_width: int = 16,
        shortcut: str = "A",
        preact: bool = False,
        num_classes: int = 10,
        in_channels: int = 3,
        dtype: Any = jnp.float32,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        zero_init_last_bn: bool = False,
        bn_group_size: int = 0,
        scan_blocks: bool = False,
        remat: bool = False,
        layer_factory: type[LayerFactory] = LayerFactory,
        rngs: nnx.Rngs,
    ):
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem={stem!r} is not valid; choose 'cifar' or 'imagenet'.")
        # bn_group_size > 0: "ghost" BN, statistics per group of that many examples.
        norm_cls = (functools.partial(GhostBatchNorm, group_size=bn_group_size)
                    if bn_group_size else None)
        layers = layer_factory(dtype=dtype, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                               norm_cls=norm_cls)
        self.stem_kind = stem
        self.preact = preact
        self.dtype = dtype
        self.act = layers.act
        kernel, stride = (3, 1) if stem == "cifar" else (7, 2)
        self.stem_conv = layers.conv(in_channels, stem_width, kernel, stride, rngs=rngs)
        # A pre-activation net's first block normalises its own input, so its stem has no BN.
        self.stem_norm = None if preact else layers.norm(stem_width, rngs=rngs)
        stages = []
        in_f = stem_width
        for i, (size, width) in enumerate(zip(stage_sizes, stage_widths, strict=True)):
            # The first stage keeps the resolution (the ImageNet stem's max pool already halved it).
            strides = 1 if i == 0 else 2
            stages.append(
                Stage(block_cls, layers, in_f, width, size, strides, shortcut=shortcut,
                      zero_init_last_bn=zero_init_last_bn, scan_blocks=scan_blocks,
                      remat=remat, rngs=rngs)
            )
            in_f = width * block_cls.expansion
        self.stages = nnx.List(stages)
        # Pre-activation nets end with BN-ReLU before pooling (He et al. 2016, Fig. 4e).
        self.final_norm = layers.norm(in_f, rngs=rngs) if preact else None
        self.head = nnx.Linear(in_f, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.num_features = in_f

    def __call__(self, x: jax.Array, return_features: bool = False):
        features = {}
        x = self.stem_conv(x.astype(self.dtype))
        if self.stem_norm is not None:
            x = self.act(self.stem_norm(x))
        if self.stem_kind == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if return_features:
            features["stem"] = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if return_features:
                features[f"stage{i + 1}"] = x
        if self.final_norm is not None:
            x = self.act(self.final_norm(x))
        x = jnp.mean(x, axis=(1, 2))
        features["pooled"] = x
        logits = self.head(x).astype(jnp.float32)
        return (logits, features) if return_features else logits


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (BN running statistics excluded)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
