"""One self-describing file per trained model: safetensors tensors + JSON metadata.

Layout:
- tensors `params/<path>` and `batch_stats/<path>` (the nested dicts of `nnx.to_pure_dict`,
  keys joined with "/"), plus `normalization/mean` and `normalization/std` (the run's training
  statistics, e.g. the per-pixel mean image);
- metadata key `resnet_jax`: JSON with the `model` config section, `num_classes`,
  `class_names`, `image_shape`, the dataset name, the step and run it came from, and for a run
  trained at `config.data.image_size` its evaluation's `center_crop` (`{"size", "resize"}`).

No optimiser state is stored. Loading rebuilds the network from the model config and checks
every tensor's name, shape and dtype against it, so a file from another version fails loudly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from resnet_jax.data import DataSpec, NormStats
from resnet_jax.rundir.files import atomic_write


class Exportable(Protocol):
    """What `save_export` reads from a model (a `Classifier` has all of it)."""

    model_config: Any
    spec: DataSpec
    center_crop: Any  # images.CenterCrop or None
    stats: NormStats
    step: int | None
    source: str

    def params(self) -> tuple[dict, dict]: ...


FORMAT = "resnet_jax.export"
VERSION = 2
# Version 2 added `center_crop`. Files without one are written as version 1, which older code
# reads correctly; a file that needs the crop is version 2, which older code refuses rather than
# resizing its inputs the wrong way.
_FIRST_VERSION = 1
META_KEY = "resnet_jax"


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    """A nested dict of arrays as {"prefix/a/0/b": array}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join([prefix, *map(_key_name, path)]): np.ascontiguousarray(np.asarray(x))
            for path, x in leaves}


def save_export(classifier: Exportable, path: str | Path) -> Path:
    """Writes `classifier`'s weights, BN statistics, normalisation and metadata to `path`.

    Raises WriteError naming `path` if it cannot be written.
    """
    path = Path(path)
    params, batch_stats = classifier.params()
    stats = classifier.stats
    tensors = {**flatten(params, "params"), **flatten(batch_stats, "batch_stats"),
               "normalization/mean": np.ascontiguousarray(stats.mean, np.float32),
               "normalization/std": np.ascontiguousarray(stats.std, np.float32)}
    spec = classifier.spec
    crop = classifier.center_crop
    meta = {
        "format": FORMAT,
        "version": _FIRST_VERSION if crop is None else VERSION,
        "model": classifier.model_config.to_dict(),
        "num_classes": int(spec.num_classes),
        "class_names": list(spec.class_names),
        "image_shape": [int(d) for d in spec.image_shape],
        "dataset": spec.name,
        "step": classifier.step,
        "source": classifier.source,
    }
    if crop is not None:
        meta["center_crop"] = crop.to_json()
    # Atomic: a crash never leaves a half-written model under the real name, and a failure
    # (no permission, a directory in the way, a full disk) leaves no temporary file behind.
    return atomic_write(path, lambda tmp: save_file(
        tensors, str(tmp), metadata={META_KEY: json.dumps(meta), "format": "np"}))


def read_export(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """`(metadata, tensors)` of an exported file; ValueError naming it if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); pass a run "
                         "directory or a file written by `resnet-jax export`.") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file without resnet_jax metadata; it was not "
                         "written by `resnet-jax export`.")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: its resnet_jax metadata is not valid JSON ({e}); the file is "
                         "damaged.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its resnet_jax metadata is not a JSON object; the file is "
                         "damaged.")
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: unsupported export format {meta.get('format')!r} "
                         f"version {meta.get('version')!r} (this code reads version {VERSION}).")
    return meta, tensors


def fill_tree(template: dict, tensors: dict[str, np.ndarray], prefix: str, path: Path) -> dict:
    """`template`'s structure (with its int/str keys) filled from `tensors`, shapes checked."""

    def take(key_path, abstract):
        name = "/".join([prefix, *map(_key_name, key_path)])
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing; the file does not match its "
                             "own model config.")
        x = tensors[name]
        if x.shape != abstract.shape or x.dtype != abstract.dtype:
            raise ValueError(f"{path}: tensor {name!r} is {x.dtype}{list(x.shape)}, the model "
                             f"expects {abstract.dtype}{list(abstract.shape)}.")
        return x

    return jax.tree_util.tree_map_with_path(take, template)


def flatten_names(tree: dict, prefix: str) -> list[str]:
    """The tensor names `flatten` would give `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join([prefix, *map(_key_name, p)]) for p, _ in leaves]
