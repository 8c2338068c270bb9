"""The Fashion-MNIST sample shipped inside the package (see assets/README.md for credit)."""

from __future__ import annotations

from importlib import resources

import numpy as np

Split = tuple[np.ndarray, np.ndarray]
SAMPLE_FILE = "fashion_mnist_sample.npz"


def load_bundled(name: str = "fashion_mnist_sample") -> tuple[Split, Split]:
    """Return ((train_images, train_labels), (test_images, test_labels)), uint8 NHWC / int32."""
    if name != "fashion_mnist_sample":
        raise ValueError(f"No bundled data for {name!r}; bundled: ('fashion_mnist_sample',)")
    path = resources.files("resnet_jax.data") / "assets" / SAMPLE_FILE
    with resources.as_file(path) as p, np.load(p) as z:
        train = (z["train_images"], z["train_labels"].astype(np.int32))
        test = (z["test_images"], z["test_labels"].astype(np.int32))
    return train, test
