"""The run's dataset spec and normalisation statistics: what using its model needs of the data.

Written when training starts, so that `predict`, `export` and `resnet_jax.load(RUN)` work after
the training data is gone:

- `dataset.json`: name, source, class names (label order), image shape, number of classes, split
  sizes and the normalisation method, readable by people and other tools;
- `normalization.npz`: the statistics (`mean`: the per-pixel mean image or per-channel means,
  `std`), float32, exactly as training applied them.

Each file is written to a temporary name and renamed, so a kill leaves it whole or absent.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from resnet_jax.data import DataSpec, NormStats
from resnet_jax.rundir.files import atomic_write, atomic_write_json

SPEC_FILE = "dataset.json"
STATS_FILE = "normalization.npz"
FORMAT_VERSION = 1


class SpecError(ValueError):
    """A run's spec file exists but cannot be read; the message names it."""


def _atomic_write(path: Path, write) -> None:
    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)  # a failure (e.g. a full disk) names the file, leaves no temp


def write_spec(workdir: str | Path, spec: DataSpec, stats: NormStats,
               normalization: str) -> None:
    """Writes `dataset.json` and `normalization.npz` into the run directory `workdir`."""
    workdir = Path(workdir)
    _atomic_write(workdir / STATS_FILE, lambda f: np.savez(
        f, mean=np.asarray(stats.mean, np.float32), std=np.asarray(stats.std, np.float32)))
    record = {
        "version": FORMAT_VERSION,
        "name": spec.name,
        "source": spec.source,
        "num_classes": int(spec.num_classes),
        "class_names": list(spec.class_names),
        "image_shape": [int(d) for d in spec.image_shape],
        "num_train": int(spec.num_train),
        "num_validation": int(spec.num_validation),
        "num_test": int(spec.num_test),
        "normalization": normalization,
        "normalization_file": STATS_FILE,
    }
    # The spec last: it is what readers look for, so its presence implies the statistics'.
    atomic_write_json(workdir / SPEC_FILE, record, indent=1)


def read_spec(workdir: str | Path) -> tuple[DataSpec, NormStats] | None:
    """The run's `(DataSpec, NormStats)`, or None for a run written before these files existed.

    Raises SpecError naming the file if one is present but unreadable.
    """
    workdir = Path(workdir)
    spec_path, stats_path = workdir / SPEC_FILE, workdir / STATS_FILE
    if not spec_path.exists():
        return None
    try:
        r = json.loads(spec_path.read_text())
        spec = DataSpec(
            name=str(r["name"]), source=str(r["source"]), num_classes=int(r["num_classes"]),
            image_shape=tuple(int(d) for d in r["image_shape"]),
            class_names=tuple(str(c) for c in r["class_names"]),
            num_train=int(r["num_train"]), num_validation=int(r["num_validation"]),
            num_test=int(r["num_test"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{spec_path} is unreadable ({type(e).__name__}: {e}); delete it to "
                        "rebuild the spec from the training data") from None
    if len(spec.class_names) != spec.num_classes:
        raise SpecError(f"{spec_path}: {len(spec.class_names)} class names for "
                        f"{spec.num_classes} classes")
    try:
        with np.load(stats_path, allow_pickle=False) as z:
            stats = NormStats(z["mean"].astype(np.float32), z["std"].astype(np.float32))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise SpecError(f"{stats_path} is missing or unreadable ({type(e).__name__}: {e}); it "
                        f"holds the normalisation statistics {SPEC_FILE} refers to") from None
    return spec, stats
