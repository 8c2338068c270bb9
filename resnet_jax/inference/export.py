"""One self-describing file per trained model: safetensors tensors + JSON metadata.

Layout:
- tensors `params/<path>` and `batch_stats/<path>` (the nested dicts of `nnx.to_pure_dict`,
  keys joined with "/"), plus `normalization/mean` and `normalization/std` (the run's training
  statistics, e.g. the per-pixel mean image);
- metadata key `resnet_jax`: JSON with the `model` config section, `num_classes`,
  `class_names`, `image_shape`, the dataset name, the step and run it came from.

No optimiser state is stored. Loading rebuilds the network from the model config and checks
every tensor's name, shape and dtype against it, so a file from another version fails loudly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from resnet_jax.data import DataSpec, NormStats
from resnet_jax.rundir.files import atomic_write

if TYPE_CHECKING:
    from resnet_jax.inference.classifier import Classifier

FORMAT = "resnet_jax.export"
VERSION = 1
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


def save_export(classifier: Classifier, path: str | Path) -> Path:
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
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": classifier.model_config.to_dict(),
        "num_classes": int(spec.num_classes),
        "class_names": list(spec.class_names),
        "image_shape": [int(d) for d in spec.image_shape],
        "dataset": spec.name,
        "step": classifier.step,
        "source": classifier.source,
    }
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


def _fill(template: dict, tensors: dict[str, np.ndarray], prefix: str, path: Path) -> dict:
    """The template's structure (with its int/str keys) filled from `tensors`, checked."""

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


def load_export(path: str | Path, batch_size: int | None = None) -> Classifier:
    """A `Classifier` from a file written by `save_export` (no run directory, no optimiser)."""
    from resnet_jax.inference.classifier import DEFAULT_BATCH_SIZE, Classifier
    from resnet_jax.train import graphdefs, model_from_config

    path = Path(path)
    meta, tensors = read_export(path)
    config = ml_collections.ConfigDict({"model": meta["model"]})
    spec = DataSpec(name=meta.get("dataset", ""), source="export",
                    num_classes=int(meta["num_classes"]),
                    image_shape=tuple(int(d) for d in meta["image_shape"]),
                    class_names=tuple(meta["class_names"]),
                    num_train=0, num_validation=0, num_test=0)
    missing = [k for k in ("normalization/mean", "normalization/std") if k not in tensors]
    if missing:
        raise ValueError(f"{path}: tensors {missing} are missing (normalisation statistics).")
    _, eval_def = graphdefs(config, spec)
    model = nnx.eval_shape(lambda: model_from_config(config, spec))
    _, p_abs, b_abs = nnx.split(model, nnx.Param, nnx.BatchStat)
    params = _fill(nnx.to_pure_dict(p_abs), tensors, "params", path)
    batch_stats = _fill(nnx.to_pure_dict(b_abs), tensors, "batch_stats", path)
    expected = {*flatten_names(params, "params"), *flatten_names(batch_stats, "batch_stats"),
                "normalization/mean", "normalization/std"}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:5]}; the file does not match its "
                         "own model config.")
    stats = NormStats(tensors["normalization/mean"], tensors["normalization/std"])
    return Classifier(model_config=config.model, spec=spec, params=params,
                      batch_stats=batch_stats, stats=stats, graphdef=eval_def,
                      step=meta.get("step"), source=str(path.absolute()),
                      batch_size=batch_size or DEFAULT_BATCH_SIZE)


def flatten_names(tree: dict, prefix: str) -> list[str]:
    """The tensor names `flatten` would give `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join([prefix, *map(_key_name, p)]) for p, _ in leaves]
