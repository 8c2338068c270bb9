"""The `data` sub-config and its validation."""

from __future__ import annotations

import ml_collections

from resnet_jax.data.catalog import IMAGE_FOLDER

SOURCES = ("auto", "tfds", "archive", "folder", "bundled")
NORMALIZATIONS = ("mean_image", "per_channel", "imagenet", "none")
# "device": the uint8 training split lives on the devices (fast, exact epochs; must fit);
# "stream": Grain reads and decodes batches on the host's CPUs (any size); "auto" picks.
PIPELINES = ("auto", "device", "stream")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults matching He et al. 2015 on CIFAR-10 (45k/5k split, mean image, pad 4, flip)."""
    return ml_collections.ConfigDict(
        {
            "name": "cifar10",
            # auto: bundled sample -> local archive (if present) -> class folders in data_dir
            # (if it holds train/) -> TFDS.
            "source": "auto",
            # None: $RESNET_JAX_DATA, then ~/.cache/resnet_jax (archives) / TFDS's default dir.
            # source="folder": a directory or .tar/.tar.gz holding train/<class>/* and test/...
            "data_dir": ml_collections.FieldReference(None, field_type=str),
            # Decoded class-folder images; None: $XDG_CACHE_HOME or ~/.cache, /resnet_jax/decoded.
            "cache_dir": ml_collections.FieldReference(None, field_type=str),
            # Processes decoding class-folder images the first time; 0: one per CPU.
            "decode_workers": 0,
            "validation_size": 5000,
            "split_seed": 0,
            "normalization": "mean_image",
            # Which input pipeline (docs/data.md): "auto" streams when the dataset cannot be
            # held on the devices (imagenet2012, or images resized on the fly: image_size).
            "pipeline": "auto",
            # Streaming: crop size of images of any size (ImageNet: 224) by random-resized crop
            # (train) or resize + centre crop (eval); None: the images' own, uniform size.
            "image_size": ml_collections.FieldReference(None, field_type=int),
            # Streaming: host threads that read and decode (0: one per CPU), and training
            # images sampled to estimate mean_image / per_channel statistics.
            "stream_threads": 0,
            "stats_images": 10000,
            "pad": 4,
            "crop": True,
            "flip": True,
        }
    )


def _choice(config: ml_collections.ConfigDict, key: str, choices: tuple[str, ...]) -> None:
    value = config[key]
    if value not in choices:
        raise ValueError(f"config.data.{key}={value!r} is not valid; choose one of {choices}")


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the key, the bad value and the valid choices."""
    _choice(config, "source", SOURCES)
    if config.source == "folder" and not config.data_dir:
        raise ValueError(
            "config.data.source='folder' needs config.data.data_dir: a directory or a .tar/.tar.gz "
            "holding train/<class>/* and test/<class>/* (or val/<class>/*)"
        )
    if config.name == IMAGE_FOLDER and (config.source not in ("auto", "folder")
                                        or not config.data_dir):
        raise ValueError(
            f"config.data.name='image_folder' reads class folders: set config.data.source to "
            f"'folder' (not {config.source!r}) and config.data.data_dir to a directory or "
            ".tar/.tar.gz holding train/<class>/* and test/<class>/*"
        )
    _choice(config, "normalization", NORMALIZATIONS)
    _choice(config, "pipeline", PIPELINES)
    size = config.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"config.data.image_size={size!r} must be a positive integer or None")
    if size is not None and config.pipeline == "device":
        raise ValueError(
            f"config.data.image_size={size} resizes images on the fly, which only the streaming "
            "pipeline does: set config.data.pipeline to 'stream' or 'auto', or image_size=None")
    for key in ("validation_size", "pad", "decode_workers", "stream_threads", "stats_images"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.data.{key}={value!r} must be an integer >= 0")
    for key in ("crop", "flip"):
        if not isinstance(config[key], bool):
            raise ValueError(f"config.data.{key}={config[key]!r} must be True or False")
