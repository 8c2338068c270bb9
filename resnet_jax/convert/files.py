"""File to file: a torch state_dict to our export format, and an export or run to torchvision."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from resnet_jax.convert import akamaster, torchvision
from resnet_jax.convert.layout import Layout
from resnet_jax.convert.mapping import Layer, check_keys, our_names, to_ours, to_torch
from resnet_jax.convert.stacking import unstack
from resnet_jax.convert.torch_io import read_state_dict, write_state_dict
from resnet_jax.data import DataSpec, NormStats
from resnet_jax.inference.classifier import Classifier
from resnet_jax.inference.export import flatten, flatten_names
from resnet_jax.inference.images import CenterCrop

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (akamaster.LAYOUT,
                                                                 torchvision.LAYOUT)}
# Directions `convert --to` supports (the CIFAR nets' option A has no torchvision twin).
EXPORT_LAYOUTS = ("torchvision",)


def get_layout(name: str) -> Layout:
    """The layout called `name`; a ValueError listing the known ones otherwise."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown PyTorch layout {name!r}; choose one of {tuple(LAYOUTS)}.")
    return LAYOUTS[name]


def resolve_depth(layout: Layout, keys: set[str], model: str | None) -> int:
    """The depth `--model` names (checked against the layout's family), or the keys' depth."""
    if model is None:
        return layout.infer_depth(keys)
    from resnet_jax.models import parse_name

    family, depth = parse_name(model)
    if family != layout.family:
        raise ValueError(f"--model {model!r} is a {family} net; --from {layout.name} holds "
                         f"{layout.family} nets: {layout.depths}.")
    if family == "cifar_resnet":
        from resnet_jax.models import cifar_blocks_per_stage

        cifar_blocks_per_stage(family, depth)  # ValueError for a depth that is not 6n+2
    return depth


def _check_shapes(tensors: dict[str, np.ndarray], template: dict[str, tuple[int, ...]],
                  layers: list[Layer], what: str) -> None:
    torch_name = {layer.ours: layer.torch for layer in layers}
    for name, shape in template.items():
        got = tensors[name].shape
        if tuple(got) != tuple(shape):
            module = name.split("/", 1)[1].rsplit("/", 1)[0]
            raise ValueError(f"torch module {torch_name.get(module, module)!r} does not fit "
                             f"{what}: our {name} would be {list(got)}, the net needs "
                             f"{list(shape)}.")


def classifier_from_state_dict(state: dict[str, np.ndarray], layout: Layout,
                               model: str | None = None,
                               class_names: tuple[str, ...] | None = None,
                               source: str = "") -> Classifier:
    """Our `Classifier` holding a torch state_dict of `layout` (depth from keys or `model`)."""
    from resnet_jax.config import default_config
    from resnet_jax.train import graphdefs, model_from_config

    keys = set(state)
    depth = resolve_depth(layout, keys, model)
    what = f"{layout.name}'s {model or f'depth-{depth} net'}"
    layers = layout.layers(depth)
    check_keys(keys, layers, what)
    num_classes = int(state[f"{layout.head}.weight"].shape[0])
    names = tuple(class_names) if class_names else layout.class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for a head of {num_classes} classes.")
    config = default_config()
    config.model.family, config.model.depth = layout.family, depth
    config.model.shortcut = layout.shortcut
    spec = DataSpec(name=layout.dataset, source=f"converted from {layout.name}",
                    num_classes=num_classes, image_shape=layout.image_shape, class_names=names,
                    num_train=0, num_validation=0, num_test=0)
    abstract = nnx.eval_shape(lambda: model_from_config(config, spec))
    _, p_abs, b_abs = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    templates = {"params": nnx.to_pure_dict(p_abs), "batch_stats": nnx.to_pure_dict(b_abs)}
    tensors = to_ours(state, layers)
    shapes = {n: x.shape for prefix, tree in templates.items()
              for n, x in zip(flatten_names(tree, prefix), jax.tree.leaves(tree), strict=True)}
    _check_shapes(tensors, shapes, layers, what)
    params, batch_stats = (
        jax.tree.unflatten(jax.tree.structure(tree),
                           [tensors[n] for n in flatten_names(tree, prefix)])
        for prefix, tree in templates.items())
    # NormStats work on the 0..255 scale: x/255 normalised by (m, s) is (x - 255m) / (255s).
    stats = NormStats(255.0 * np.asarray(layout.mean, np.float32),
                      255.0 * np.asarray(layout.std, np.float32))
    _, eval_def = graphdefs(config, spec)
    crop = CenterCrop(*layout.eval_crop) if layout.eval_crop else None
    return Classifier(model_config=config.model, spec=spec, params=params,
                      batch_stats=batch_stats, stats=stats, graphdef=eval_def, source=source,
                      center_crop=crop)


def convert_torch_file(path: str | Path, layout_name: str, out: str | Path,
                       model: str | None = None,
                       class_names: tuple[str, ...] | None = None) -> Classifier:
    """Reads a torch checkpoint of `layout_name`, writes it to `out` in our export format."""
    layout = get_layout(layout_name)
    state = read_state_dict(path)
    clf = classifier_from_state_dict(state, layout, model, class_names,
                                     source=f"{layout.name}:{Path(path).name}")
    clf.export(out)
    return clf


def torchvision_state_dict(clf: Classifier) -> dict[str, np.ndarray]:
    """A torchvision `resnet{depth}(num_classes=...)` state_dict of an ImageNet-family model."""
    m = clf.model_config
    problems = []
    if m.family != "imagenet_resnet":
        problems.append(f"model.family={m.family!r} (torchvision has imagenet_resnet only)")
    if m.shortcut not in ("", "B"):
        problems.append(f"model.shortcut={m.shortcut!r} (torchvision's is B)")
    if clf.image_shape[-1] != 3:
        problems.append(f"{clf.image_shape[-1]} input channels (torchvision's stem takes 3)")
    if problems:
        raise ValueError(f"{clf.source} has no torchvision twin: {'; '.join(problems)}.")
    params, batch_stats = clf.params()
    tensors = unstack({**flatten(params, "params"), **flatten(batch_stats, "batch_stats")})
    layers = torchvision.layers(int(m.depth))
    extra = sorted(set(tensors) - our_names(layers))
    if extra:
        raise ValueError(f"{clf.source}: tensors without a torchvision place: {extra[:5]}.")
    return to_torch(tensors, layers, batches_tracked=int(clf.step or 0))


def export_torchvision(source: str | Path, out: str | Path) -> Classifier:
    """Writes the model of a run directory or export file as a torchvision `.pth` state_dict."""
    from resnet_jax.inference.loading import load

    clf = load(source)
    write_state_dict(torchvision_state_dict(clf), out)
    return clf
