"""Residual and plain networks as Flax NNX modules (He et al. 2015, 2016): the architecture only.

NHWC, stock Flax NNX layers. Backend speed-ups (`resnet_jax.backends`) reach these models only
through the `LayerFactory` they are built with.
"""

from resnet_jax.models.blocks import (
    SHORTCUTS,
    BasicBlock,
    BottleneckBlock,
    PreActBasicBlock,
    PreActBottleneckBlock,
)
from resnet_jax.models.ghost_norm import GhostBatchNorm
from resnet_jax.models.layers import LayerFactory, option_a_shortcut
from resnet_jax.models.registry import (
    FAMILIES,
    build,
    cifar_blocks_per_stage,
    create,
    default_input_shape,
    parse_name,
)
from resnet_jax.models.resnet import ResNet, Stage, count_params

__all__ = [
    "FAMILIES",
    "SHORTCUTS",
    "BasicBlock",
    "BottleneckBlock",
    "GhostBatchNorm",
    "LayerFactory",
    "PreActBasicBlock",
    "PreActBottleneckBlock",
    "ResNet",
    "Stage",
    "build",
    "cifar_blocks_per_stage",
    "count_params",
    "create",
    "default_input_shape",
    "option_a_shortcut",
    "parse_name",
]
