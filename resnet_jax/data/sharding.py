"""Placing batches and the training set on a device mesh (single- and multi-host)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Leading (batch) dimension split over the mesh's `axis`."""
    return NamedSharding(mesh, P(axis))


def _global_from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Every host holds the same full array: each device takes its own slice of it.
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_batch(tree: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Put a GLOBAL host batch (identical on every host) on the mesh, split along `axis`.

    This is the case for this package's small datasets: each host loads the whole dataset, so
    eval batches are the same everywhere. The batch size must divide by the axis size.
    """
    sharding = data_sharding(mesh, axis)
    return jax.tree.map(lambda x: _global_from_host(x, sharding), tree)


def shard_local_batch(tree: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Build global arrays from each process's LOCAL slice of the batch (streaming input).

    With jax.process_count() > 1 every process passes only its own rows (global batch /
    process_count); jax.make_array_from_process_local_data assembles the global array.
    """
    sharding = data_sharding(mesh, axis)
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a full copy of every leaf on every device of the mesh (e.g. the uint8 train set)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _global_from_host(x, sharding), tree)
