"""TFDS source: read prepared array_record data with `tfds.data_source` (no TensorFlow import).

Preparing a missing dataset needs TensorFlow (the `[prepare]` extra) and the network; without
either we fail at once with a message naming the alternatives, instead of letting TFDS retry.
"""

from __future__ import annotations

import importlib.util
import socket

import numpy as np

from resnet_jax.data.catalog import DatasetInfo, DatasetNotFoundError, where_to_put

Split = tuple[np.ndarray, np.ndarray]
# The host TFDS downloads from; a 3 s connect attempt replaces TFDS's minutes of retries.
_PROBE_HOST = ("storage.googleapis.com", 443)


def tensorflow_available() -> bool:
    """True if TensorFlow can be imported (checked without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def network_available(timeout: float = 3.0) -> bool:
    """True if the TFDS download host accepts a TCP connection within `timeout` seconds."""
    try:
        with socket.create_connection(_PROBE_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _to_arrays(source, name: str) -> Split:
    # Index one by one: the mocked source in tfds.testing does not support __getitems__.
    examples = [source[i] for i in range(len(source))]
    if not examples:
        raise ValueError(f"TFDS dataset {name!r} has an empty split")
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
    labels = np.asarray([int(ex["label"]) for ex in examples], np.int32)
    if images.ndim == 3:  # grayscale without a channel axis
        images = images[..., None]
    return images, labels


def _prepare(builder, info: DatasetInfo, data_dir: str | None) -> None:
    hint = where_to_put(info, data_dir) if info.archive_sets else ""
    where = f"not prepared in {builder.data_dir}"
    other = ("or use source='archive'" if info.archive_sets else
             "or read class folders: --config.data.source=folder --config.data.data_dir=DIR "
             "(DIR or DIR.tar holding train/<class>/*.JPEG and val/<class>/*.JPEG)")
    if not tensorflow_available():
        raise DatasetNotFoundError(
            f"TFDS dataset {info.tfds_name!r} is {where}, and preparing it needs TensorFlow: "
            f"pip install 'resnet-jax[prepare]' (or prepare it once elsewhere with "
            f"file_format='array_record' and copy the folder), {other}. {hint}".rstrip()
        )
    if not network_available():
        raise DatasetNotFoundError(
            f"TFDS dataset {info.tfds_name!r} is {where} and the network is unreachable. {hint}"
        )
    builder.download_and_prepare()


def load_tfds(info: DatasetInfo, data_dir: str | None) -> tuple[Split, Split, list[str] | None]:
    """Load the train and test splits of `info` from TFDS, preparing them if needed and possible."""
    if info.name == "imagenet2012":
        raise NotImplementedError(
            "imagenet2012 does not fit on the devices; it is read by the streaming pipeline "
            "(config.data.pipeline='stream' or 'auto', see docs/data.md)"
        )
    import tensorflow_datasets as tfds  # deferred: the import costs about a second

    # No file_format: TFDS refuses to open a folder prepared in another format than the one
    # asked for (a raw ValueError) before we could say what to do about it.
    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    try:
        sources = builder.as_data_source(split=["train", "test"])
    except Exception as e:  # TFDS raises KeyError / AssertionError / ... when not prepared
        if builder.is_prepared():
            raise RuntimeError(
                f"TFDS dataset {info.tfds_name!r} in {builder.data_dir} cannot be read as "
                "array_record (was it prepared with file_format='tfrecord'?). Re-prepare it "
                f"with file_format='array_record'. ({type(e).__name__}: {e})"
            ) from e
        builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
        _prepare(builder, info, data_dir)
        sources = builder.as_data_source(split=["train", "test"])
    train, test = (_to_arrays(s, info.tfds_name) for s in sources)
    names = None
    try:
        names = list(builder.info.features["label"].names)
    except (KeyError, AttributeError):
        pass
    for split_name, (_, labels) in (("train", train), ("test", test)):
        if labels.min() < 0 or labels.max() >= info.num_classes:
            raise ValueError(
                f"TFDS {info.tfds_name}/{split_name}: label out of range [0, {info.num_classes})"
            )
    return train, test, names
