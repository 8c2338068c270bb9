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

from resnet_jax.kernels import onednn_conv
from resnet_jax.models.batch_norm import BatchNorm
from resnet_jax.models.ghost_norm import GhostBatchNorm
from resnet_jax.models.layers import LayerFactory, materialize

CONV_IMPLS = ("auto", "xla", "onednn")


def check_conv_impl(conv_impl: str) -> str:
    """Returns `conv_impl` if it is one of CONV_IMPLS, else raises a ValueError listing them."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r} is not valid; choose one of {CONV_IMPLS}.")
    return conv_impl


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

    `conv_impl` picks the convolutions: "xla" (XLA's own, NHWC activations), "onednn" (oneDNN's
    direct CPU kernels, `resnet_jax.kernels.onednn_conv`: activations then stay in the blocked
    layout (N, C/8, H, W, 8) from the stem to the pooling, and blocks see 5-D arrays) or "auto":
    "onednn" when the trace is for one CPU device, oneDNN loads and the net allows it (CIFAR
    stem, float32, plain BatchNorm, widths divisible by 8), else "xla". Both give the same
    values to float32 rounding (tests/test_onednn.py); parameters and checkpoints are identical.
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
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem={stem!r} is not valid; choose 'cifar' or 'imagenet'.")
        # bn_group_size > 0: "ghost" BN, statistics per group of that many examples.
        norm_cls = (functools.partial(GhostBatchNorm, group_size=bn_group_size)
                    if bn_group_size else BatchNorm)
        layers = LayerFactory(dtype=dtype, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                              norm_cls=norm_cls)
        self.stem_kind = stem
        self.preact = preact
        self.dtype = dtype
        self.conv_impl = check_conv_impl(conv_impl)
        # Why oneDNN cannot run this net (None: it can); checked when conv_impl="onednn".
        widths = (stem_width, *(w * block_cls.expansion for w in stage_widths))
        self.onednn_obstacle = (
            "an ImageNet stem (max pooling)" if stem != "cifar"
            else f"dtype {jnp.dtype(dtype).name} (float32 only)" if jnp.dtype(dtype) != jnp.float32
            else "ghost BatchNorm" if bn_group_size
            else f"widths {widths} (need multiples of {onednn_conv.BLOCK})"
            if any(w % onednn_conv.BLOCK for w in widths)
            else None)
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

    def uses_onednn(self) -> bool:
        """Whether a call traced now runs oneDNN's convolutions (see the class docstring)."""
        if self.conv_impl == "xla":
            return False
        if self.conv_impl == "onednn":
            if self.onednn_obstacle:
                raise ValueError(f"conv_impl='onednn' cannot run this net: {self.onednn_obstacle};"
                                 " use conv_impl='xla' or 'auto'.")
            if not onednn_conv.available():
                raise RuntimeError(f"conv_impl='onednn': {onednn_conv.unavailable_reason()}.")
            return True
        # A custom call has no SPMD partitioning rule: on a multi-device mesh XLA would gather
        # the batch onto every device, so "auto" keeps XLA's convolutions there.
        return (self.onednn_obstacle is None and jax.default_backend() == "cpu"
                and jax.device_count() == 1 and onednn_conv.available())

    def __call__(self, x: jax.Array, return_features: bool = False):
        features = {}
        blocked = self.uses_onednn()
        if blocked:
            x = self.stem_conv.image_to_blocked(x.astype(self.dtype))
        else:
            x = self.stem_conv(x.astype(self.dtype))
        if self.stem_norm is not None:
            x = materialize(nnx.relu(self.stem_norm(x)))
        if self.stem_kind == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        nhwc = onednn_conv.from_blocked if blocked else (lambda v: v)
        if return_features:
            features["stem"] = nhwc(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if return_features:
                features[f"stage{i + 1}"] = nhwc(x)
        if self.final_norm is not None:
            x = nnx.relu(self.final_norm(x))
        # Blocked (N, C/8, H, W, 8) pools to (N, C/8, 8), i.e. channel c at [c // 8, c % 8].
        x = jnp.mean(x, axis=(2, 3) if blocked else (1, 2)).reshape(x.shape[0], -1)
        features["pooled"] = x
        logits = self.head(x).astype(jnp.float32)
        return (logits, features) if return_features else logits


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (BN running statistics excluded)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
