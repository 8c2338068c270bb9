"""Model names -> constructors: `create("resnet56")`, `create("plain56")`, `create("resnet50")`.

Families (`family` in the model config):
  cifar_resnet        He et al. 2015 sec. 4.2: depth 6n+2, basic blocks, option A shortcuts.
  cifar_plain         the same nets with the shortcuts removed (the "plain" twins).
  cifar_preact        pre-activation basic blocks, depth 6n+2 (arXiv:1603.05027).
  cifar_preact_bottleneck  pre-activation bottleneck blocks, depth 9n+2 (ResNet-164, -1001).
  imagenet_resnet     ResNet-18/34 (basic) and -50/101/152 (bottleneck, v1.5 strides).

Names: `resnet{D}` (ImageNet for D in 18/34/50/101/152, CIFAR otherwise), `cifar_resnet{D}`,
`plain{D}`, `preact_resnet{D}` (bottleneck for 164 and 1001, basic otherwise),
`preact_bottleneck{D}`, `imagenet_resnet{D}`, `imagenet_plain{D}`.
"""

from __future__ import annotations

import re
from typing import Any

from flax import nnx

from resnet_jax.models.blocks import (
    BasicBlock,
    BottleneckBlock,
    PreActBasicBlock,
    PreActBottleneckBlock,
    check_shortcut,
)
from resnet_jax.models.resnet import ResNet

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
IMAGENET_STAGE_SIZES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (BottleneckBlock, (3, 4, 6, 3)),
    101: (BottleneckBlock, (3, 4, 23, 3)),
    152: (BottleneckBlock, (3, 8, 36, 3)),
}
# (block, layers per block, default shortcut) of each CIFAR family.
CIFAR_FAMILIES = {
    "cifar_resnet": (BasicBlock, 2, "A"),
    "cifar_plain": (BasicBlock, 2, "none"),
    "cifar_preact": (PreActBasicBlock, 2, "A"),
    "cifar_preact_bottleneck": (PreActBottleneckBlock, 3, "B"),
}
FAMILIES = (*CIFAR_FAMILIES, "imagenet_resnet", "imagenet_plain")

_NAME_PATTERNS = (
    (r"cifar_resnet(\d+)", "cifar_resnet"),
    (r"plain(\d+)", "cifar_plain"),
    (r"cifar_plain(\d+)", "cifar_plain"),
    (r"preact_bottleneck(\d+)", "cifar_preact_bottleneck"),
    (r"imagenet_resnet(\d+)", "imagenet_resnet"),
    (r"imagenet_plain(\d+)", "imagenet_plain"),
)


def cifar_blocks_per_stage(family: str, depth: int) -> int:
    """n of a CIFAR net: depth = 6n+2 for basic blocks, 9n+2 for bottlenecks; else a ValueError."""
    _, layers_per_block, _ = CIFAR_FAMILIES[family]
    per_stage = 3 * layers_per_block
    n, remainder = divmod(depth - 2, per_stage)
    if remainder or n < 1:
        valid = ", ".join(str(per_stage * k + 2) for k in (1, 2, 3, 5, 7, 9, 18))
        raise ValueError(
            f"depth={depth} is not valid for {family}: its depth must be {per_stage}n+2 "
            f"(the stem, 3 stages of n blocks of {layers_per_block} layers, the classifier), "
            f"e.g. {valid}."
        )
    return n


def parse_name(name: str) -> tuple[str, int]:
    """Splits a model name into (family, depth); raises a ValueError listing valid names."""
    if m := re.fullmatch(r"resnet(\d+)", name):
        depth = int(m.group(1))
        return ("imagenet_resnet" if depth in IMAGENET_STAGE_SIZES else "cifar_resnet"), depth
    if m := re.fullmatch(r"preact_resnet(\d+)", name):
        depth = int(m.group(1))
        return ("cifar_preact_bottleneck" if depth in (164, 1001) else "cifar_preact"), depth
    for pattern, family in _NAME_PATTERNS:
        if m := re.fullmatch(pattern, name):
            return family, int(m.group(1))
    raise ValueError(
        f"Unknown model name {name!r}. Valid names: resnet{{6n+2}} (e.g. resnet20, resnet56, "
        "resnet110, resnet1202), plain{6n+2} (plain20..plain110), preact_resnet{6n+2}, "
        "preact_resnet164, preact_resnet1001, preact_bottleneck{9n+2}, cifar_resnet{6n+2}, "
        "resnet18/34/50/101/152 (ImageNet), imagenet_plain18/34."
    )


def build(family: str, depth: int, *, seed: int = 0, shortcut: str | None = None,
          **kwargs: Any) -> ResNet:
    """Builds a `family` network of `depth`; `kwargs` go to `ResNet` (num_classes, dtype...)."""
    rngs = nnx.Rngs(seed)
    if family in CIFAR_FAMILIES:
        block_cls, _, default_shortcut = CIFAR_FAMILIES[family]
        n = cifar_blocks_per_stage(family, depth)
        if family == "cifar_plain" and shortcut not in (None, "none"):
            raise ValueError(f"shortcut={shortcut!r} contradicts the plain family; use 'none'.")
        return ResNet(
            block_cls=block_cls,
            stage_sizes=(n, n, n),
            stage_widths=CIFAR_WIDTHS,
            stem="cifar",
            stem_width=16,
            shortcut=check_shortcut(shortcut or default_shortcut),
            preact=block_cls in (PreActBasicBlock, PreActBottleneckBlock),
            rngs=rngs,
            **kwargs,
        )
    if family in ("imagenet_resnet", "imagenet_plain"):
        if depth not in IMAGENET_STAGE_SIZES:
            raise ValueError(
                f"depth={depth} is not valid for {family}; choose one of "
                f"{sorted(IMAGENET_STAGE_SIZES)}."
            )
        block_cls, sizes = IMAGENET_STAGE_SIZES[depth]
        default_shortcut = "none" if family == "imagenet_plain" else "B"
        kwargs.setdefault("num_classes", 1000)
        return ResNet(
            block_cls=block_cls,
            stage_sizes=sizes,
            stage_widths=IMAGENET_WIDTHS,
            stem="imagenet",
            stem_width=64,
            shortcut=check_shortcut(shortcut or default_shortcut),
            rngs=rngs,
            **kwargs,
        )
    raise ValueError(f"Unknown model family {family!r}; choose one of {FAMILIES}.")


def create(name: str, **kwargs: Any) -> ResNet:
    """Builds a registered model by name, e.g. `create("resnet56", num_classes=100)`."""
    family, depth = parse_name(name)
    return build(family, depth, **kwargs)


def default_input_shape(name_or_family: str, depth: int | None = None) -> tuple[int, int, int]:
    """The input (H, W, C) a model was designed for: 32x32x3 for CIFAR, 224x224x3 for ImageNet."""
    family = name_or_family if depth is not None else parse_name(name_or_family)[0]
    return (224, 224, 3) if family.startswith("imagenet") else (32, 32, 3)
