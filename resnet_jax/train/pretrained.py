"""`config.train.init_from`: start a run from the weights of a model file.

The file is one written by `resnet-jax export` or `resnet-jax convert` (our export format). Its
parameters and BatchNorm statistics replace the fresh ones, tensor by tensor, with two
adaptations, each announced in one line:
- the classifier head is re-initialised (kept as freshly built) when the file's number of
  classes differs from the run's;
- a 3-channel stem kernel is summed over its input channels for a 1-channel (grayscale) run:
  the net then responds to a gray image exactly as the file's net does to that image
  replicated to three identically normalised channels.
Anything else that does not fit (another depth, width, shortcut type) is an error naming the
tensors. Only a fresh run is initialised; a resumed run continues from its own checkpoint.
The optimiser state stays fresh, and inputs are normalised with the run's own statistics.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_jax.config import ConfigError
from resnet_jax.data import DataSpec, replicate

STEM = "params/stem_conv/kernel"
HEAD = "params/head/"


def _host(tree):
    # addressable_data(0): a replicated array's full value, also when several processes share it.
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _gray_stem_of(file_kernel: np.ndarray | None, run_kernel: np.ndarray) -> bool:
    """Whether the run's HWIO stem takes one channel where the file's takes several."""
    if file_kernel is None or run_kernel.shape[2] != 1:
        return False
    h, w, _, o = file_kernel.shape
    return (h, w, o) == (run_kernel.shape[0], run_kernel.shape[1], run_kernel.shape[3])


def _fit(fresh: dict[str, np.ndarray], loaded: dict[str, np.ndarray]):
    """`(tensors, adapted, problems)`: the run's tensors taken from `loaded` where they fit."""
    out, adapted, problems = {}, set(), []
    for name, x in fresh.items():
        y = loaded.get(name)
        if y is not None and y.shape == x.shape:
            out[name] = y.astype(x.dtype)
        elif name.startswith(HEAD):
            out[name] = x  # a new head for another number of classes: keep the fresh one
            adapted.add("head")
        elif name == STEM and _gray_stem_of(y, x):
            out[name] = y.sum(axis=2, keepdims=True).astype(x.dtype)
            adapted.add("stem")
        elif y is None:
            problems.append(f"{name} missing")
        else:
            problems.append(f"{name} is {list(y.shape)} in the file, {list(x.shape)} here")
    unexpected = sorted(set(loaded) - set(fresh))
    problems += [f"{name} not in this model" for name in unexpected]
    return out, adapted, problems


def init_from_file(state, config: ml_collections.ConfigDict, spec: DataSpec, mesh: Mesh):
    """`(state, notes)`: `state` with parameters and BN statistics from `config.train.init_from`.

    Raises ConfigError naming the file if it cannot be read or does not fit the model.
    """
    from resnet_jax.convert.stacking import stack_like, unstack
    from resnet_jax.inference.export import flatten, read_export

    path = Path(config.train.init_from)
    if not path.is_file():
        raise ConfigError(f"config.train.init_from={str(path)!r}: no such file; give a model "
                          "file written by `resnet-jax export` or `resnet-jax convert`.")
    try:
        meta, tensors = read_export(path)
    except ValueError as e:
        raise ConfigError(f"config.train.init_from: {e}") from None
    fresh = {**flatten(_host(state.params), "params"),
             **flatten(_host(state.batch_stats), "batch_stats")}
    loaded = unstack({k: v for k, v in tensors.items()
                      if k.startswith(("params/", "batch_stats/"))})
    tensors, adapted, problems = _fit(unstack(fresh), loaded)
    m = meta["model"]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                           if len(problems) > 6 else "")
        raise ConfigError(
            f"config.train.init_from={str(path)!r} ({m.get('family')} depth {m.get('depth')}) "
            f"does not fit config.model ({config.model.family} depth {config.model.depth}): "
            f"{shown}.")
    tensors = stack_like(tensors, {k: v.shape for k, v in fresh.items()})
    params = _unflatten(state.params, tensors, "params")
    batch_stats = _unflatten(state.batch_stats, tensors, "batch_stats")
    params, batch_stats = replicate((params, batch_stats), mesh)
    notes = [f"init_from: parameters and BN statistics of {path} ({m.get('family')} depth "
             f"{m.get('depth')}); inputs normalised with this run's statistics "
             f"(data.normalization={config.data.normalization!r})."]
    if m.get("family") != config.model.family:
        notes.append(f"init_from: the file is a {m.get('family')} net, this run a "
                     f"{config.model.family}: the same tensors, another network.")
    if "head" in adapted:
        notes.append(f"init_from: classifier head re-initialised: the file has "
                     f"{meta.get('num_classes')} classes, this run {spec.num_classes}.")
    elif tuple(meta.get("class_names", ())) != tuple(spec.class_names):
        notes.append(f"init_from: classifier head kept ({spec.num_classes} classes in both), "
                     f"though the class names differ (file: {', '.join(meta['class_names'][:3])}"
                     f", ...; run: {', '.join(spec.class_names[:3])}, ...).")
    if "stem" in adapted:
        notes.append(f"init_from: the file's {meta['image_shape'][-1]}-channel stem summed over "
                     "its input channels for this run's 1-channel images.")
    return state.replace(params=params, batch_stats=batch_stats), notes


def _unflatten(template, tensors: dict[str, np.ndarray], prefix: str):
    from resnet_jax.inference.export import flatten_names

    leaves = [tensors[n] for n in flatten_names(template, prefix)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)
