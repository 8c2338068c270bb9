"""Using a trained model: evaluate a checkpoint, classify images, export a model file.

See docs/inference.md. `resnet_jax.load(path)` is `load` below.
"""

from resnet_jax.inference.classifier import Classifier, Prediction
from resnet_jax.inference.export import read_export, save_export
from resnet_jax.inference.images import (
    CenterCrop,
    ImageLoadError,
    expand_paths,
    load_image,
    to_model_array,
)
from resnet_jax.inference.loading import from_run, load, load_export

__all__ = [
    "CenterCrop",
    "Classifier",
    "ImageLoadError",
    "Prediction",
    "expand_paths",
    "from_run",
    "load",
    "load_export",
    "load_image",
    "read_export",
    "save_export",
    "to_model_array",
]
