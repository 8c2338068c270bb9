"""The training run's input: the resident split on the devices, or a Grain stream.

Both give the train loop the same four things: the dataset spec and normalisation statistics,
`block(k)` (the `data` argument of k jitted train steps), `eval_batches(split)` (global
`(images, labels, mask)` arrays covering a split once) and, when streaming, the Grain iterator
whose state each checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.data import Dataset, DataSpec, NormStats, eval_batches, replicate, shard_batch
from resnet_jax.data import stream as streaming
from resnet_jax.data.sharding import shard_local_batch

# Resident data beyond this fraction of one device's memory is refused ("stream it").
RESIDENT_MEMORY_FRACTION = 0.5


def device_memory_bytes() -> int | None:
    """The first local device's memory limit, or None where JAX does not report one (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


class DoesNotFitError(ValueError):
    """The training split is too large to be held on the devices."""


class DeviceInput:
    """The whole uint8 training split replicated on every device (the resident pipeline)."""

    streamed = False
    iterator = None
    note = ""

    def __init__(self, ds: Dataset, mesh: Mesh):
        limit = device_memory_bytes()
        size = ds.train_images.nbytes
        if limit is not None and size > RESIDENT_MEMORY_FRACTION * limit:
            raise DoesNotFitError(
                f"the training split ({size / 2**30:.2f} GiB of uint8 images) does not fit "
                f"comfortably in one device's {limit / 2**30:.2f} GiB (at most "
                f"{RESIDENT_MEMORY_FRACTION:.0%}); set config.data.pipeline='stream' or 'auto' to "
                "stream it from the host")
        self.spec, self.stats, self.mesh = ds.spec, ds.stats, mesh
        self.data = replicate((ds.train_images, ds.train_labels, ds.stats), mesh)
        self.stats_on_device = self.data[2]
        self._splits = {"validation": (ds.validation_images, ds.validation_labels),
                        "test": (ds.test_images, ds.test_labels)}

    def seek(self, step: int, restored: bool) -> None:
        """Nothing to do: the batch of step s is computed on the devices from (seed, s)."""

    def block(self, k: int):
        """The `data` argument of a block of k train steps: always the resident split."""
        return self.data

    def eval_size(self, split: str) -> int:
        """Examples in `split`."""
        return len(self._splits[split][0])

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple]:
        """Global (images, labels, mask) batches covering `split` once."""
        images, labels = self._splits[split]
        for batch in eval_batches(images, labels, batch_size):
            yield shard_batch(batch, self.mesh)

    def close(self) -> None:
        """Nothing to release."""


class StreamInput:
    """Batches read, decoded and cropped on the host by Grain, this process's rows only."""

    streamed = True

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh,
                 stats: NormStats | None = None, note: str = ""):
        self.note = note  # why this run streams, when "auto" chose it for lack of memory
        d, t = config.data, config.train
        self.splits = streaming.open_stream(d, stats)
        self.spec: DataSpec = self.splits.spec
        self.stats: NormStats = self.splits.stats
        self.mesh = mesh
        self.threads = streaming.threads(d)
        self._where = dict(process_index=jax.process_index(), process_count=jax.process_count())
        train = streaming.train_dataset(self.splits, t.batch_size, t.seed, crop=d.crop,
                                        flip=d.flip, **self._where)
        self.iterator: grain.DatasetIterator = streaming.iterate(train, self.threads)
        self.stats_on_device = replicate(self.stats, mesh)
        self._block_sharding = NamedSharding(mesh, P(None, "data"))

    def seek(self, step: int, restored: bool) -> None:
        """Positions the stream at `step`; a restored iterator state must already be there."""
        position = self.iterator.get_state().get("next_index")
        if restored and position is not None:
            if position != step:
                raise RuntimeError(f"the checkpoint of step {step} holds an input iterator at "
                                   f"batch {position}; they must agree")
            return
        # A checkpoint without iterator state (e.g. written by the resident pipeline's run):
        # the batch of step s is a pure function of (seed, s), so the index is the step.
        self.iterator.set_state({**self.iterator.get_state(), "next_index": step})

    def block(self, k: int):
        """The next k batches, stacked as `(images [k, B, ...], labels [k, B], stats)`."""
        batches = [next(self.iterator) for _ in range(k)]
        if k == 1:  # a view with the block axis, not a copy of the batch
            images, labels = batches[0][0][None], batches[0][1][None]
        else:
            images = np.stack([b[0] for b in batches])
            labels = np.stack([b[1] for b in batches])
        if jax.process_count() == 1:
            placed = jax.device_put((images, labels), self._block_sharding)
        else:
            placed = tuple(jax.make_array_from_process_local_data(self._block_sharding, x)
                           for x in (images, labels))
        return (*placed, self.stats_on_device)

    def eval_size(self, split: str) -> int:
        """Examples in `split`."""
        return len(self.splits.validation if split == "validation" else self.splits.test)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple]:
        """Global (images, labels, mask) batches covering `split` once, read as they are used."""
        for batch in streaming.read_eval(self.splits, split, batch_size, self.threads,
                                         **self._where):
            yield shard_local_batch(batch, self.mesh)

    def close(self) -> None:
        """Stops the reading threads."""
        streaming.close(self.iterator)


def open_input(config: ml_collections.ConfigDict, mesh: Mesh, dataset: Dataset | None = None,
               stats: NormStats | None = None, load=None):
    """The run's input by config.data.pipeline: a StreamInput, or a DeviceInput of `dataset`
    (loaded with `load(config.data)` when not given). "auto" streams a training split that
    turns out not to fit on the devices. `stats` spares a stream re-estimating the
    normalisation statistics of a resumed run."""
    if dataset is None and streaming.resolve_pipeline(config.data) == "stream":
        return StreamInput(config, mesh, stats)
    try:
        return DeviceInput(dataset if dataset is not None else load(config.data), mesh)
    except DoesNotFitError as e:
        if config.data.pipeline != "auto" or dataset is not None:
            raise
        return StreamInput(config, mesh, stats, note=f"Streaming the input: {e}.".replace(
            "; set config.data.pipeline='stream' or 'auto' to stream it from the host", ""))
