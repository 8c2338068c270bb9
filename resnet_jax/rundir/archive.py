"""Starting a run directory over: what the old run wrote is moved aside, nothing is deleted."""

from __future__ import annotations

import time
from pathlib import Path

ARCHIVE_DIR = "archive"
# Everything a run writes into its directory (the lock file and earlier archives stay).
RUN_ENTRIES = ("config.json", "versions.json", "dataset.json", "normalization.npz",
               "metrics.jsonl", "tensorboard", "checkpoints", "checkpoints.corrupt", "eval",
               "export", "analysis.json")


def archive_run(run_dir: str | Path) -> Path | None:
    """Moves the run's files into `run_dir/archive/<UTC time>/`; returns that folder.

    Returns None if there was nothing to move (a new directory).
    """
    run_dir = Path(run_dir)
    present = [run_dir / name for name in RUN_ENTRIES if (run_dir / name).exists()]
    if not present:
        return None
    dest = run_dir / ARCHIVE_DIR / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    suffix = 0
    while dest.exists():  # two restarts within one second
        suffix += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{suffix}")
    dest.mkdir(parents=True)
    for p in present:
        p.rename(dest / p.name)  # same file system: a rename, atomic per entry
    return dest
