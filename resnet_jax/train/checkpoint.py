"""Orbax checkpoints of the train state: async, atomic, last K plus the best by validation error.

Orbax writes each step into a temporary directory and renames it when complete, so a kill at any
moment leaves every listed checkpoint whole. Restoring walks back from the newest step and skips
any checkpoint that fails to read (truncated file, missing metadata), with a warning naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax.train.state import TrainState

log = logging.getLogger(__name__)
BEST_METRIC = "validation_error"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that must not be written."""


def _finite(tree) -> bool:
    return all(
        bool(np.all(np.isfinite(np.asarray(x))))
        for x in jax.tree.leaves(tree)
        if np.issubdtype(np.asarray(x).dtype, np.floating)
    )


class Checkpointer:
    """Saves and restores `TrainState`s under `directory` (one sub-directory per step)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: TrainState, metrics: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` at its step (async); never writes non-finite parameters."""
        step = int(state.step)
        if not _finite((state.params, state.batch_stats)):
            raise CheckpointError(
                f"Refusing to save step {step}: parameters are not finite. The last good "
                f"checkpoint ({self.latest_step()}) is kept."
            )
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        return self.manager.save(step, args=ocp.args.StandardSave(state.as_dict()),
                                 metrics=metrics, force=force)

    def wait(self) -> None:
        """Blocks until pending async saves are on disk; raises if one failed."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the lowest validation error among the kept checkpoints, or None."""
        return self.manager.best_step()

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restores `step` (default: newest good one) into `target`'s structure and shardings.

        `target` may hold arrays or `jax.ShapeDtypeStruct`s. With no step given, a checkpoint
        that cannot be read is skipped with a warning and the previous one is tried.
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target.as_dict(),
        )
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if step is not None and step not in self.steps():
            raise CheckpointError(
                f"No checkpoint for step {step} in {self.directory}; available: {self.steps()}."
            )
        errors = []
        for s in candidates:
            try:
                restored = self.manager.restore(s, args=ocp.args.StandardRestore(abstract))
                return TrainState(**restored)
            except Exception as e:  # noqa: BLE001 - any read failure means "not usable"
                msg = f"checkpoint {self.directory / str(s)} is unreadable"
                msg += f" ({type(e).__name__}: {e})"
                errors.append(msg)
                if step is not None:
                    break
                log.warning("%s; falling back to the previous checkpoint.", msg)
        detail = "; ".join(errors) if errors else "the directory holds no checkpoint"
        raise CheckpointError(f"No usable checkpoint in {self.directory}: {detail}.")

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
