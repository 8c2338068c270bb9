"""Loading a model for inference: from a run directory or from an exported file.

`load` is `resnet_jax.load`. Neither path needs the optimiser state or the training data.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx

from resnet_jax.data import DataSpec, NormStats
from resnet_jax.inference.classifier import DEFAULT_BATCH_SIZE, Classifier
from resnet_jax.inference.export import fill_tree, flatten_names, read_export
from resnet_jax.inference.images import CenterCrop


def from_run(workdir: str | Path, step: int | None = None, best: bool = False,
             batch_size: int = DEFAULT_BATCH_SIZE) -> Classifier:
    """A classifier from a run directory's checkpoint (the newest, `step`, or the best).

    Needs nothing but the run directory: class names, image shape and normalisation come from
    its dataset spec (runs written before the spec existed load their dataset instead), and a
    run trained at `config.data.image_size` converts images with its evaluation's centre crop.
    """
    from resnet_jax.train import restore_model

    config, spec, stats, state, eval_def, mesh = restore_model(workdir, step=step, best=best)
    return Classifier(model_config=config.model, spec=spec, params=state.params,
                      batch_stats=state.batch_stats, stats=stats, graphdef=eval_def,
                      step=int(state.step), source=str(Path(workdir).absolute()),
                      batch_size=batch_size, mesh=mesh,
                      center_crop=CenterCrop.for_data(config.data))


def load(path: str | Path, step: int | None = None, best: bool = False,
         batch_size: int = DEFAULT_BATCH_SIZE) -> Classifier:
    """A `Classifier` from a run directory (checkpoint `step`, the best, or the newest) or from
    a file written by `resnet-jax export`. Loading never needs the optimiser state."""
    path = Path(path)
    if path.is_dir():
        return from_run(path, step=step, best=best, batch_size=batch_size)
    if path.is_file():
        if step is not None or best:
            raise ValueError(f"{path} is an exported model with one set of weights; "
                             "step= and best= apply only to run directories.")
        return load_export(path, batch_size=batch_size)
    raise FileNotFoundError(f"{path}: no such run directory or exported model file.")


def load_export(path: str | Path, batch_size: int | None = None) -> Classifier:
    """A `Classifier` from a file written by `save_export` (no run directory, no optimiser)."""
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
    params = fill_tree(nnx.to_pure_dict(p_abs), tensors, "params", path)
    batch_stats = fill_tree(nnx.to_pure_dict(b_abs), tensors, "batch_stats", path)
    expected = {*flatten_names(params, "params"), *flatten_names(batch_stats, "batch_stats"),
                "normalization/mean", "normalization/std"}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:5]}; the file does not match its "
                         "own model config.")
    stats = NormStats(tensors["normalization/mean"], tensors["normalization/std"])
    crop = meta.get("center_crop")
    crop = None if crop is None else CenterCrop.from_json(crop, str(path))
    return Classifier(model_config=config.model, spec=spec, params=params,
                      batch_stats=batch_stats, stats=stats, graphdef=eval_def,
                      step=meta.get("step"), source=str(path.absolute()),
                      batch_size=batch_size or DEFAULT_BATCH_SIZE, center_crop=crop)
