"""torchvision.models.resnet{18,34,50,101,152}: ImageNet ResNets (v1.5 bottlenecks).

Keys: `conv1`, `bn1`, `layer{1..4}.{b}.conv{1,2[,3]}`, `layer{1..4}.{b}.bn{1,2[,3]}`,
`layer{s}.0.downsample.{0,1}` (a 1x1 convolution and BN where the shape changes: our option B
projection) and `fc`. The stride of a bottleneck is on its 3x3 convolution in both.
"""

from __future__ import annotations

from resnet_jax.convert.layout import Layout, block_counts, numbered, our_block
from resnet_jax.convert.mapping import Layer
from resnet_jax.models.blocks import BottleneckBlock
from resnet_jax.models.registry import IMAGENET_STAGE_SIZES


def _is_bottleneck(depth: int) -> bool:
    return IMAGENET_STAGE_SIZES[depth][0] is BottleneckBlock


def infer_depth(keys: set[str]) -> int:
    """The depth whose blocks per stage (and block type) the keys show."""
    counts = tuple(block_counts(keys, 4))
    bottleneck = "layer1.0.conv3.weight" in keys
    for depth, (block_cls, sizes) in IMAGENET_STAGE_SIZES.items():
        if sizes == counts and (block_cls is BottleneckBlock) == bottleneck:
            return depth
    known = ", ".join(f"resnet{d}: {s}" for d, (_, s) in IMAGENET_STAGE_SIZES.items())
    raise ValueError(f"these keys are not a torchvision ResNet: blocks per stage {list(counts)} "
                     f"({'bottleneck' if bottleneck else 'basic'} blocks); torchvision's are "
                     f"{known}. Use --from akamaster for CIFAR nets.")


def layers(depth: int) -> list[Layer]:
    """The `Layer` list of torchvision's `resnet{depth}()`."""
    _, sizes = IMAGENET_STAGE_SIZES[depth]
    convs = 3 if _is_bottleneck(depth) else 2
    result = [Layer("stem_conv", "conv1", "conv"), Layer("stem_norm", "bn1", "bn")]
    for s, n in enumerate(sizes):
        for b in range(n):
            ours, theirs = our_block(s, b), f"layer{s + 1}.{b}"
            for i in range(1, convs + 1):
                result += [Layer(f"{ours}/conv{i}", f"{theirs}.conv{i}", "conv"),
                           Layer(f"{ours}/bn{i}", f"{theirs}.bn{i}", "bn")]
            # The first block of every stage changes the shape, except in ResNet-18/34's first.
            if b == 0 and (s > 0 or convs == 3):
                result += [Layer(f"{ours}/projection/conv", f"{theirs}.downsample.0", "conv"),
                           Layer(f"{ours}/projection/norm", f"{theirs}.downsample.1", "bn")]
    result.append(Layer("head", "fc", "linear"))
    return result


def imagenet_class_names() -> tuple[str, ...] | None:
    """ImageNet-1k's class names in torchvision's label order, or None if unavailable.

    Taken from the first synonym of each label of tensorflow_datasets' ImageNet label list
    (a dependency already), which is in the same WordNet-id order as torchvision's classes.
    """
    try:
        from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST
    except ImportError:
        return None
    names = tuple(label.split(",")[0].strip() for label in IMAGENET_LABELS_LIST)
    return names if len(names) == 1000 else None


def class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet's names for a 1000-class head, else numbers."""
    names = imagenet_class_names() if num_classes == 1000 else None
    return names or numbered(num_classes)


LAYOUT = Layout(
    name="torchvision",
    family="imagenet_resnet",
    shortcut="B",
    depths="resnet18, resnet34, resnet50, resnet101, resnet152",
    infer_depth=infer_depth,
    layers=layers,
    head="fc",
    dataset="imagenet2012",
    image_shape=(224, 224, 3),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    class_names=class_names,
    eval_crop=(224, 256),  # torchvision's weights are scored on Resize(256) + CenterCrop(224)
)
