"""A minimal, pure train/eval step for benchmarking (the training library's step is separate).

The model is split once into (graphdef, params, batch_stats); the jitted step merges them, runs BN
in train mode, and returns new params, optimizer state and BN statistics. With a mesh, the batch is
split over the mesh's "data" axis and everything else is replicated: XLA's SPMD partitioner then
computes BN statistics and gradients over the global batch (the same maths as one device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import models


@dataclasses.dataclass
class BenchState:
    """Everything a benchmark step needs: graph definitions, arrays, optimizer."""

    train_def: Any
    eval_def: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    tx: optax.GradientTransformation
    uses_onednn: bool = False  # the model's convolutions are oneDNN custom calls


def build_state(
    name: str,
    *,
    dtype: Any = jnp.float32,
    scan_blocks: bool = True,
    remat: bool = False,
    seed: int = 0,
    mesh: Mesh | None = None,
    learning_rate: float = 0.1,
    conv_impl: str = "auto",
) -> BenchState:
    """Initialises `name` under jit (eager NNX init is slow), replicated on `mesh` if given."""

    def make() -> nnx.Module:
        return models.create(name, dtype=dtype, scan_blocks=scan_blocks, remat=remat, seed=seed,
                             conv_impl=conv_impl)

    abstract = nnx.eval_shape(make)
    abstract.train()
    train_def, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    abstract.eval()
    eval_def, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    tx = optax.sgd(learning_rate, momentum=0.9)

    def init() -> tuple[Any, Any, Any]:
        _, params, stats = nnx.split(make(), nnx.Param, nnx.BatchStat)
        return params, stats, tx.init(params)

    out_shardings = NamedSharding(mesh, P()) if mesh is not None else None
    params, stats, opt_state = jax.jit(init, out_shardings=out_shardings)()
    return BenchState(train_def, eval_def, params, stats, opt_state, tx, abstract.uses_onednn())


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(
    state: BenchState, *, weight_decay: float = 1e-4, mesh: Mesh | None = None
) -> Callable:
    """Returns jitted `step(params, stats, opt_state, x, y) -> (params, stats, opt_state, loss)`.

    Parameters, statistics and optimizer state are donated: XLA updates them in place.
    """
    graphdef, tx = state.train_def, state.tx

    def step(params, stats, opt_state, x, y):
        def loss_fn(p, stats):
            # copy=True: fresh Variables at this trace level, so BN may update its statistics.
            model = nnx.merge(graphdef, p, stats, copy=True)
            logits = model(x)
            # Weight decay on conv/dense kernels only (the paper's 1e-4), not on BN or biases.
            l2 = sum(jnp.sum(k**2) for k in _kernels(p))
            loss = _loss(logits, y)
            return loss + 0.5 * weight_decay * l2, (loss, nnx.state(model, nnx.BatchStat))

        grads, (loss, new_stats) = jax.grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, new_stats, opt_state, loss

    kw: dict[str, Any] = {"donate_argnums": (0, 1, 2)}
    if mesh is not None:
        rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        kw.update(in_shardings=(rep, rep, rep, dat, dat), out_shardings=(rep, rep, rep, rep))
    return jax.jit(step, **kw)


def make_eval_step(state: BenchState, *, mesh: Mesh | None = None) -> Callable:
    """Returns jitted `eval_step(params, stats, x, y) -> (loss, correct)` with BN in eval mode."""
    graphdef = state.eval_def

    def step(params, stats, x, y):
        logits = nnx.merge(graphdef, params, stats, copy=True)(x)
        return _loss(logits, y), jnp.sum(jnp.argmax(logits, -1) == y)

    kw: dict[str, Any] = {}
    if mesh is not None:
        rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        kw.update(in_shardings=(rep, rep, dat, dat), out_shardings=(rep, rep))
    return jax.jit(step, **kw)


def _kernels(params: Any) -> list[jax.Array]:
    """Leaves named `kernel` (conv and dense weights)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if any(getattr(k, "key", None) == "kernel" for k in path):
            out.append(leaf)
    return out


def make_mesh(num_devices: int | None = None) -> Mesh | None:
    """A 1-D "data" mesh over the first `num_devices` devices (all by default); None for one."""
    devices = jax.devices()[: num_devices or len(jax.devices())]
    if len(devices) <= 1:
        return None
    return Mesh(devices, ("data",))
