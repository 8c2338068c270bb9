"""resnet_jax.data: dataset name -> host splits -> on-device, jittable, exactly-epoched batches.

See docs/data.md for usage.
"""

from resnet_jax.data.augment import AugmentConfig, augment, random_crop, random_flip
from resnet_jax.data.catalog import (
    DATASET_NAMES,
    DATASETS,
    IMAGE_FOLDER,
    DatasetNotFoundError,
    get_info,
)
from resnet_jax.data.config import (
    NORMALIZATIONS,
    SOURCES,
    default_data_config,
    validate_data_config,
)
from resnet_jax.data.folders import FolderLayoutError, ImageDecodeError
from resnet_jax.data.loader import Dataset, DataSpec, load_dataset, load_raw, load_split
from resnet_jax.data.pipeline import (
    batch_indices,
    data_keys,
    epoch_permutation,
    eval_batches,
    steps_per_epoch,
    train_batch,
)
from resnet_jax.data.preprocess import NormStats, compute_stats, normalize
from resnet_jax.data.sharding import data_sharding, replicate, shard_batch, shard_local_batch
from resnet_jax.data.splits import split_indices

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "IMAGE_FOLDER",
    "NORMALIZATIONS",
    "SOURCES",
    "AugmentConfig",
    "DataSpec",
    "Dataset",
    "DatasetNotFoundError",
    "FolderLayoutError",
    "ImageDecodeError",
    "NormStats",
    "augment",
    "batch_indices",
    "compute_stats",
    "data_keys",
    "data_sharding",
    "default_data_config",
    "epoch_permutation",
    "eval_batches",
    "get_info",
    "load_dataset",
    "load_raw",
    "load_split",
    "normalize",
    "random_crop",
    "random_flip",
    "replicate",
    "shard_batch",
    "shard_local_batch",
    "split_indices",
    "steps_per_epoch",
    "train_batch",
    "validate_data_config",
]
