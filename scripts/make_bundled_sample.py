"""Regenerate resnet_jax/data/assets/fashion_mnist_sample.npz from Debian's Fashion-MNIST files.

A class-balanced subset (500 train + 100 test images per class by default), chosen with a fixed
seed so the file is reproducible. Source: `apt-get install dataset-fashion-mnist`, which installs
the original Zalando Research files (MIT licence) in /usr/share/datasets/fashion-mnist/.

    python scripts/make_bundled_sample.py [--src DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# Let the script run from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_jax.data.archives import read_mnist_dir  # noqa: E402
from resnet_jax.data.catalog import FASHION_MNIST_SYSTEM_DIR, MNIST_FILES  # noqa: E402

_OUT = Path(__file__).resolve().parents[1] / "resnet_jax/data/assets/fashion_mnist_sample.npz"
_MAX_BYTES = 5 * 1024 * 1024


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_class` random examples of every class."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(int(labels.max()) + 1)
    ]
    return np.sort(np.concatenate(picks))


def main() -> None:
    """Build the sample and check that it stays under 5 MB."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--src", default=FASHION_MNIST_SYSTEM_DIR)
    p.add_argument("--out", default=str(_OUT))
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    (xtr, ytr), (xte, yte) = read_mnist_dir([Path(args.src) / f for f in MNIST_FILES])
    rng = np.random.default_rng(args.seed)
    itr = balanced_subset(ytr, args.train_per_class, rng)
    ite = balanced_subset(yte, args.test_per_class, rng)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        train_images=xtr[itr],
        train_labels=ytr[itr].astype(np.uint8),
        test_images=xte[ite],
        test_labels=yte[ite].astype(np.uint8),
        # Positions in the original files, so the subset can be traced back.
        train_source_index=itr.astype(np.int32),
        test_source_index=ite.astype(np.int32),
    )
    size = out.stat().st_size
    print(f"wrote {out}: {len(itr)} train + {len(ite)} test images, {size / 1e6:.2f} MB")
    if size >= _MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes, over the 5 MB limit")


if __name__ == "__main__":
    main()
