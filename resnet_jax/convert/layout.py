"""What a supported PyTorch model family looks like: keys, depths, preprocessing, classes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from resnet_jax.convert.mapping import Layer


@dataclasses.dataclass(frozen=True)
class Layout:
    """A PyTorch ResNet family's state_dict layout and what the converted model needs.

    Attributes:
      name: the `--from` / `--to` value.
      family: our model family the nets convert to (`models.build` name).
      shortcut: our shortcut option that reproduces theirs.
      depths: a description of the valid depths, for error messages.
      infer_depth: the depth a set of state_dict keys implies (ValueError if none).
      layers: the `Layer` list of a net of a given depth.
      head: the torch module of the classifier (its weight's rows are the classes).
      dataset, image_shape, mean, std: what the nets were trained on, with their input
        normalisation on the [0, 1] scale (RGB).
      class_names: the class names for a number of classes.
      eval_crop: (size, resize) of the evaluation's centre crop (shorter side to `resize`,
        centre `size` crop) the nets were scored with, or None for a plain resize.
    """

    name: str
    family: str
    shortcut: str
    depths: str
    infer_depth: Callable[[set[str]], int]
    layers: Callable[[int], list[Layer]]
    head: str
    dataset: str
    image_shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: Callable[[int], tuple[str, ...]]
    eval_crop: tuple[int, int] | None = None


def block_counts(keys: set[str], stages: int) -> list[int]:
    """Blocks per stage from keys like `layer2.3.conv1.weight` (`layer1` .. `layer<stages>`)."""
    counts = []
    for s in range(1, stages + 1):
        pattern = re.compile(rf"layer{s}\.(\d+)\.")
        indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        counts.append(max(indices) + 1 if indices else 0)
    return counts


def our_block(stage: int, block: int) -> str:
    """Our module path of block `block` of stage `stage` (both from 0), unscanned."""
    return f"stages/{stage}/first" if block == 0 else f"stages/{stage}/rest/{block - 1}"


def numbered(num_classes: int) -> tuple[str, ...]:
    """Class names "0", "1", ... for a head whose classes have no known names."""
    return tuple(str(i) for i in range(num_classes))
