"""Seeded, stable train/validation split of a training set."""

from __future__ import annotations

import numpy as np


def split_indices(n: int, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_idx, validation_idx), disjoint, covering range(n), both sorted.

    A pure function of (n, validation_size, seed): numpy's PCG64 permutation, so the same seed
    always holds out the same examples. Sorting keeps the train set in its original order, which
    makes the held-out set the only thing the seed changes.
    """
    if not 0 <= validation_size < n:
        raise ValueError(
            f"validation_size={validation_size} must be in [0, {n}) for a training set of {n}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[validation_size:]), np.sort(perm[:validation_size])
