"""The `data` sub-config and its validation."""

from __future__ import annotations

import ml_collections

SOURCES = ("auto", "tfds", "archive", "bundled")
NORMALIZATIONS = ("mean_image", "per_channel", "none")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults matching He et al. 2015 on CIFAR-10 (45k/5k split, mean image, pad 4, flip)."""
    return ml_collections.ConfigDict(
        {
            "name": "cifar10",
            # auto: bundled sample -> local archive (if present) -> TFDS.
            "source": "auto",
            # None: $RESNET_JAX_DATA, then ~/.cache/resnet_jax (archives) / TFDS's default dir.
            "data_dir": ml_collections.FieldReference(None, field_type=str),
            "validation_size": 5000,
            "split_seed": 0,
            "normalization": "mean_image",
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
    _choice(config, "normalization", NORMALIZATIONS)
    for key in ("validation_size", "pad"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.data.{key}={value!r} must be an integer >= 0")
    for key in ("crop", "flip"):
        if not isinstance(config[key], bool):
            raise ValueError(f"config.data.{key}={config[key]!r} must be True or False")
