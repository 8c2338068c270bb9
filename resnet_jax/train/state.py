"""The train state: everything a run needs to continue exactly, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from resnet_jax import backends, models
from resnet_jax.data import DataSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    """Parameters, BN statistics, optimiser state, step, PRNG key and health counters.

    `params` and `batch_stats` are plain nested dicts (`nnx.to_pure_dict`), so checkpoints are
    readable without the model class; `rng` is raw key data (uint32) for the same reason.
    """

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: Any
    rng: jax.Array
    loss_scale: jax.Array  # 1.0 unless dynamic loss scaling (float16) is on
    good_steps: jax.Array  # finite steps since the loss scale last changed
    nonfinite_consecutive: jax.Array
    nonfinite_total: jax.Array

    def as_dict(self) -> dict:
        """The fields as a dict (the checkpoint layout)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def model_from_config(config: ml_collections.ConfigDict, spec: DataSpec,
                      seed: int = 0) -> models.ResNet:
    """Builds the configured network for a dataset's classes and channels, with the layers of
    the backend `config.model.backend` resolves to on this machine (`backends.select`)."""
    m = config.model
    backend, _ = backends.select(m.backend, dtype=DTYPES[m.dtype])
    return models.build(
        m.family,
        m.depth,
        seed=seed,
        shortcut=m.shortcut or None,
        num_classes=spec.num_classes,
        in_channels=spec.image_shape[-1],
        dtype=DTYPES[m.dtype],
        bn_momentum=m.bn_momentum,
        bn_epsilon=m.bn_epsilon,
        zero_init_last_bn=m.zero_init_last_bn,
        bn_group_size=m.bn_group_size,
        scan_blocks=m.scan_blocks,
        remat=m.remat,
        layer_factory=backends.layer_factory(backend),
    )


def graphdefs(config: ml_collections.ConfigDict, spec: DataSpec):
    """The model's static structure in train mode and in eval mode (built abstractly)."""
    model = nnx.eval_shape(lambda: model_from_config(config, spec))
    model.train()
    train_def = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
    model.eval()
    eval_def = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
    return train_def, eval_def


def init_state(config: ml_collections.ConfigDict, spec: DataSpec, tx) -> TrainState:
    """A fresh state; pure, so it can run under jit with replicated out_shardings."""
    seed = config.train.seed
    model = model_from_config(config, spec, seed=seed)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    scale = config.train.loss_scale or 1.0
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        loss_scale=jnp.asarray(scale, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        nonfinite_consecutive=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )


def abstract_state(config: ml_collections.ConfigDict, spec: DataSpec, tx,
                   sharding: jax.sharding.Sharding) -> TrainState:
    """The state's shapes and dtypes with `sharding`, built without computing anything: the
    target a checkpoint is restored into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        jax.eval_shape(lambda: init_state(config, spec, tx)))


def create_state(config: ml_collections.ConfigDict, spec: DataSpec, tx,
                 sharding: jax.sharding.Sharding) -> TrainState:
    """A fresh state, initialised on the devices with `sharding`.

    Compiled at XLA optimisation level 0: it runs once, and the optimised compile of dozens of
    random initialisers (threefry) takes ~6x longer on CPU than the unoptimised one.
    """
    init = jax.jit(lambda: init_state(config, spec, tx), out_shardings=sharding)
    return init.lower().compile({"xla_backend_optimization_level": 0})()
