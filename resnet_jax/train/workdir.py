"""Guards around a run directory: one writer at a time, no silent restart, where to resume.

Used by the training loop (`loop.py`); the files themselves are `resnet_jax.rundir`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from resnet_jax.rundir.archive import archive_run
from resnet_jax.rundir.lock import WorkdirLock, WorkdirLockedError
from resnet_jax.rundir.metrics import read_metrics
from resnet_jax.train.checkpoint import Checkpointer, CheckpointError


@contextlib.contextmanager
def lock_workdir(workdir: Path) -> Iterator[None]:
    """Holds `workdir`'s lock (process 0 takes it; every process learns whether it could)."""
    lock = WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not multihost_utils.broadcast_one_to_all(np.int32(error is None)) and error is None:
            error = WorkdirLockedError(f"--workdir {workdir} is in use by another run (process "
                                       "0 says who).")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


def restart_workdir(workdir: Path, logger_message: Callable[[str], None]) -> None:
    """Moves the old run's files into workdir/archive/ so the run starts from step 0."""
    if jax.process_index() == 0:
        dest = archive_run(workdir)
        if dest is not None:
            logger_message(f"--restart: the previous run's files were moved to {dest}.")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("resnet_jax restart archived")


def refuse_lost_progress(workdir: Path, ckpt: Checkpointer, checkpoint_every: int) -> None:
    """Raises CheckpointError if the run had checkpoints and none is left to resume from.

    Starting silently from step 0 would overwrite the evidence and the user's expectation: the
    refusal stands, every rerun, until the checkpoints are restored or `--restart` is passed.
    """
    ckpt.raise_if_all_quarantined()
    logged = [r["step"] for r in read_metrics(workdir)]
    if logged and max(logged) > checkpoint_every:
        raise CheckpointError(
            f"No checkpoint in {ckpt.directory}, but {workdir / 'metrics.jsonl'} shows the run "
            f"reached step {max(logged)}: its checkpoints were deleted or are on a disk that is "
            f"not mounted. Restore {ckpt.directory}, or pass --restart to start the run again "
            f"from step 0 (the old run's files are moved to {workdir / 'archive'}/)."
        )


def last_checkpoint_note(ckpt: Checkpointer) -> str:
    """Where a failed run can resume from, for an error message."""
    with contextlib.suppress(Exception):
        ckpt.wait()  # a pending save that still succeeds counts; a failed one is not listed
    step = ckpt.safe_latest_step()
    if step is None:
        return "No checkpoint was written yet; fix this, then rerun the same command."
    return (f"The last complete checkpoint (step {step}) is kept; fix this (free disk space), "
            "then rerun the same command to resume from it.")
