"""Section 4.2's analysis from a run's checkpoints: layer-response std and per-layer gradient norms.

Both read an unrolled CIFAR net (`model.scan_blocks=False`, the default) from its checkpoints:
  - `layer_response_std`: the standard deviation, over the test set, of each 3x3 layer's response
    after BN and before the addition/nonlinearity (the paper's Figure 7). The 6n layers inside the
    blocks are measured, in network order (the stem is not a block layer and is left out).
  - `gradient_norms`: the L2 norm of the loss gradient w.r.t. each conv kernel (stem, every block
    layer) at every saved checkpoint, on one fixed training batch, BN in train mode as in training.
    It lets a user check the paper's claim that plain nets do not fail by vanishing gradients.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from resnet_jax.data import normalize

RESPONSES = ("response1", "response2")


def _blocks(stages) -> list:
    """The blocks of `stages` in network order; works on a module or on its pure params dict."""
    out = []
    for i in sorted(stages, key=int) if isinstance(stages, dict) else range(len(stages)):
        stage = stages[i]
        # A stage of one block has an empty `rest`, which its pure dict leaves out entirely.
        first, rest = (stage["first"], stage.get("rest", {})) if isinstance(stage, dict) else (
            stage.first, stage.rest)
        out.append(first)
        out += [rest[j] for j in (sorted(rest, key=int) if isinstance(rest, dict)
                                  else range(len(rest)))]
    return out


def _check_unrolled(config) -> None:
    if config.model.scan_blocks:
        raise ValueError("the layer analysis needs an unrolled model; this run has "
                         "model.scan_blocks=True")


def _restore(workdir: str | Path, step: int | None = None):
    """(config, dataset, state, eval graphdef) of a run's checkpoint (default: the latest),
    restored onto one device: the analysis is small, and one device compiles faster than an SPMD
    program over a multi-device mesh."""
    from resnet_jax.train import restore_run

    config, ds, state, eval_def, _ = restore_run(workdir, step, devices=jax.devices()[:1])
    _check_unrolled(config)
    return config, ds, state, eval_def


def analyse_run(workdir: str | Path, max_examples: int | None = None) -> dict:
    """Both analyses of a run from one restore: {"responses": ..., "gradients": ...}."""
    config, ds, state, eval_def = _restore(workdir)
    return {"responses": _response_std(ds, state, eval_def, max_examples),
            "gradients": _gradient_norms(workdir, config, ds, state)}


def layer_response_std(workdir: str | Path, step: int | None = None,
                       max_examples: int | None = None, batch_size: int = 500) -> dict:
    """{"step", "std": [per-layer std], "layers": [names], "count"} on the run's test set."""
    _, ds, state, eval_def = _restore(workdir, step)
    return _response_std(ds, state, eval_def, max_examples, batch_size)


def _response_std(ds, state, eval_def, max_examples: int | None = None,
                  batch_size: int = 500) -> dict:
    images = ds.test_images[:max_examples] if max_examples else ds.test_images
    batch_size = min(batch_size, len(images))

    @jax.jit
    def moments(params, batch_stats, x_u8, mask):
        model = nnx.merge(eval_def, params, batch_stats)
        model.set_attributes(record_responses=True)
        _, recorded = nnx.capture(model, nnx.Intermediate)(normalize(x_u8, ds.stats))
        w = mask.astype(jnp.float32)[:, None, None, None]
        out = []
        for block in _blocks(nnx.to_pure_dict(recorded)["stages"]):
            for name in RESPONSES:
                if name in block:
                    r = block[name][0].astype(jnp.float32)
                    # Sums over every element of the layer's output, so batches add up exactly.
                    out.append((jnp.sum(r * w), jnp.sum(r * r * w), jnp.sum(w) * r[0].size))
        return out

    totals = None
    names = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        mask = np.ones(len(x), bool)
        if len(x) < batch_size:  # pad the last batch so one compiled shape serves all
            pad = batch_size - len(x)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, bool)])
        got = [tuple(float(v) for v in t) for t in jax.device_get(
            moments(state.params, state.batch_stats, x, mask))]
        totals = got if totals is None else [tuple(a + b for a, b in zip(t, g, strict=True))
                                             for t, g in zip(totals, got, strict=True)]
    for b, block in enumerate(_blocks(state.params["stages"])):
        names += [f"block{b + 1}.conv{k + 1}" for k in range(len(RESPONSES))
                  if f"conv{k + 1}" in block]
    std = [float(np.sqrt(max(s2 / n - (s / n) ** 2, 0.0))) for s, s2, n in totals]
    return {"step": int(state.step), "std": std, "layers": names[:len(std)],
            "count": len(images)}


def conv_kernels(params: dict) -> list[tuple[str, object]]:
    """(name, kernel) of every convolution in network order: the stem, then each block's convs."""
    layers = [("stem", params["stem_conv"]["kernel"])]
    for b, block in enumerate(_blocks(params["stages"])):
        for k in sorted(n for n in block if n.startswith("conv")):
            layers.append((f"block{b + 1}.{k}", block[k]["kernel"]))
    return layers


def gradient_norms(workdir: str | Path, batch_size: int = 128) -> dict:
    """{"steps", "layers", "norms": [[per-layer norm] per step]} at every saved checkpoint.

    The batch is the first `batch_size` training images (fixed, not augmented), so the curves
    differ only by the parameters, not by the data.
    """
    config, ds, state, _ = _restore(workdir)
    return _gradient_norms(workdir, config, ds, state, batch_size)


def _gradient_norms(workdir, config, ds, state, batch_size: int = 128) -> dict:
    from resnet_jax.train.checkpoint import Checkpointer
    from resnet_jax.train.state import graphdefs

    train_def, _ = graphdefs(config, ds.spec)
    x = normalize(jnp.asarray(ds.train_images[:batch_size]), ds.stats)
    y = jnp.asarray(ds.train_labels[:batch_size])

    @jax.jit
    def layer_norms(params, batch_stats):
        def loss_fn(p):
            model = nnx.merge(train_def, p, batch_stats)
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        grads = jax.grad(loss_fn)(params)
        return [jnp.linalg.norm(g) for _, g in conv_kernels(grads)]

    ckpt = Checkpointer(Path(workdir).absolute() / "checkpoints", read_only=True)
    try:
        steps = ckpt.steps()
        norms = []
        for s in steps:
            st = state if s == int(state.step) else ckpt.restore(state, s)
            norms.append([float(v) for v in jax.device_get(layer_norms(st.params,
                                                                       st.batch_stats))])
    finally:
        ckpt.close()
    return {"steps": steps, "layers": [n for n, _ in conv_kernels(state.params)], "norms": norms}
