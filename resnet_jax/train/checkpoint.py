"""Orbax checkpoints of the train state: async, atomic, verified, last K plus the best.

Orbax writes each step into a temporary directory and renames it when complete, so a kill at any
moment leaves every listed checkpoint whole (leftover temporary directories are removed when the
next run starts). Once a save has been committed we add a manifest (`MANIFEST`: size and SHA-256
of every file), because Orbax/TensorStore do not notice every truncated or missing file at
restore. Restoring walks back from the newest step and skips any checkpoint that fails the
manifest or fails to read, with a warning naming it; a skipped checkpoint is moved aside to
`<checkpoints>.corrupt/` so that the run can write that step again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax.train.state import TrainState

log = logging.getLogger(__name__)
BEST_METRIC = "validation_error"
MANIFEST = "resnet_jax_manifest.json"


def _not_missing_metrics(record: logging.LogRecord) -> bool:
    # Orbax warns at every save without metrics once best_fn is set; a checkpoint between two
    # evaluations has no validation error by design, so that warning would only be noise.
    return not str(record.msg).startswith("Requested `tracked_metric`")


logging.getLogger("absl").addFilter(_not_missing_metrics)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that must not (or could not) be written."""


def _finite(tree) -> bool:
    return all(
        bool(np.all(np.isfinite(np.asarray(x))))
        for x in jax.tree.leaves(tree)
        if np.issubdtype(np.asarray(x).dtype, np.floating)
    )


def _best_metric(metrics: dict) -> float:
    return metrics[BEST_METRIC]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(step_dir: Path) -> None:
    """Records size and SHA-256 of every file under a committed checkpoint's `step_dir`."""
    files = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(MANIFEST):
            files[str(p.relative_to(step_dir))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, step_dir / MANIFEST)  # atomic: a kill leaves no half-written manifest


def verify_manifest(step_dir: Path) -> str | None:
    """What is wrong with `step_dir` according to its manifest, or None if it matches.

    A checkpoint without a manifest (killed between commit and manifest, or written by an older
    version) is not judged here; Orbax's own read errors still catch most damage.
    """
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"its manifest {MANIFEST} is unreadable ({e})"
    for rel, want in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"file {rel} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"file {rel} has {size} bytes, expected {want['size']} (truncated?)"
        if _sha256(p) != want["sha256"]:
            return f"file {rel} does not match its checksum (corrupted)"
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full ({e})"
    # Orbax/TensorStore messages can run to many lines; the first one says what happened.
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class Checkpointer:
    """Saves and restores `TrainState`s under `directory` (one sub-directory per step)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=_best_metric, reverse=True, n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # Without best_fn Orbax neither writes a step's metrics to disk nor ranks by them:
            # best_step() would be the latest, and a resumed run would forget which step is best.
            best_fn=_best_metric,
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # A kill during an async save leaves a temporary directory: remove it on restart.
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._unverified: list[int] = []  # saved by us, manifest not yet written
        self._skipped: set[int] = set()  # unreadable steps that restore() walked past
        self._in_flight: int | None = None

    def _fail(self, step: int | None, e: BaseException) -> CheckpointError:
        kept = [s for s in self._safe_steps() if s != step]
        keep = (f"The previous checkpoint (step {kept[-1]}) is kept" if kept
                else "No earlier checkpoint exists")
        return CheckpointError(
            f"Could not write the checkpoint of step {step} to {self.directory}: {_describe(e)}. "
            f"{keep}; free disk space or fix the directory, then rerun the same command to "
            "resume from it."
        )

    def _safe_steps(self) -> list[int]:
        try:
            return self.steps()
        except Exception:  # noqa: BLE001 - only used to word an error message
            return []

    def _check_directory(self, step: int) -> None:
        if not self.directory.is_dir():
            # Orbax would silently recreate it; a vanished directory (deleted, unmounted) means
            # every earlier checkpoint is gone too, which the user must hear about now.
            raise CheckpointError(
                f"Could not write the checkpoint of step {step}: the checkpoint directory "
                f"{self.directory} has disappeared (deleted or unmounted?). Restore it, or "
                "rerun with a new --workdir."
            )

    def _write_manifests(self) -> None:
        """Adds manifests to the checkpoints we saved whose commit has completed."""
        if not self._unverified or jax.process_index() != 0:
            self._unverified = []
            return
        for step in list(self._unverified):
            # The final directory appears only when Orbax's atomic rename commits the step.
            step_dir = self.directory / str(step)
            if step == self._in_flight and not step_dir.is_dir():
                continue
            self._unverified.remove(step)
            if step_dir.is_dir():
                try:
                    write_manifest(step_dir)
                except FileNotFoundError:
                    pass  # removed meanwhile by the preservation policy

    def save(self, state: TrainState, metrics: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` at its step (async); never writes non-finite parameters.

        `metrics` holding `validation_error` are stored with the step and rank it for
        `best_step()` and the retention of the best; other steps are kept only while recent.

        Raises CheckpointError when this or the previous (async) save could not be written.
        """
        step = int(state.step)
        if not _finite((state.params, state.batch_stats)):
            raise CheckpointError(
                f"Refusing to save step {step}: parameters are not finite. The last good "
                f"checkpoint ({self.latest_step()}) is kept."
            )
        self._check_directory(step)
        if step in self._skipped:
            # Saving over a step that failed to read: keep the old one as evidence, elsewhere.
            self._skipped.discard(step)
            self._quarantine(step)
        # Only a step with a validation error can be ranked for "the best" (and kept as such).
        metrics = ({k: float(v) for k, v in metrics.items()}
                   if metrics and BEST_METRIC in metrics else None)
        previous = self._in_flight
        try:
            # Orbax first waits for the previous async save and re-raises its failure here.
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure of a write is reported the same way
            raise self._fail(previous, e) from e
        self._in_flight = None
        try:
            saved = self.manager.save(step, args=ocp.args.StandardSave(state.as_dict()),
                                      metrics=metrics, force=force)
        except Exception as e:  # noqa: BLE001
            raise self._fail(step, e) from e
        if saved:
            self._in_flight = step
            self._unverified.append(step)
        self._write_manifests()
        return saved

    def wait(self) -> None:
        """Blocks until pending async saves are on disk; raises CheckpointError if one failed."""
        step = self._in_flight
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._fail(step, e) from e
        finally:
            self._in_flight = None
        self._write_manifests()

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the lowest validation error among the kept checkpoints, or None when
        none was saved with one."""
        return self.manager.best_step()  # ranked by best_fn / best_mode (see __init__)

    def _quarantine(self, step: int) -> Path | None:
        """Moves an unusable checkpoint aside so the run can save that step again."""
        if self.read_only or jax.process_index() != 0:
            return None
        dest = self.directory.parent / f"{self.directory.name}.corrupt" / f"{step}-{time.time_ns()}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
        except OSError:
            return None
        self.manager.reload()
        return dest

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
            step_dir = self.directory / str(s)
            problem = verify_manifest(step_dir)
            corrupt = problem is not None
            if not corrupt:
                try:
                    restored = self.manager.restore(s, args=ocp.args.StandardRestore(abstract))
                    return TrainState(**restored)
                except Exception as e:  # noqa: BLE001 - any read failure means "not usable"
                    problem = f"it cannot be read ({_describe(e)})"
            msg = f"checkpoint {step_dir} is unusable: {problem}"
            errors.append(msg)
            if step is not None:
                break
            # Proven corrupt: move it aside now. A read failure may also mean a config that no
            # longer matches (--allow-config-change), so it stays until that step is saved again.
            moved = self._quarantine(s) if corrupt else None
            if not corrupt:
                self._skipped.add(s)
            where = f" (moved to {moved})" if moved else ""
            log.warning("%s%s; falling back to the previous checkpoint.", msg, where)
        if not candidates:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        raise CheckpointError(
            f"No usable checkpoint in {self.directory}: {'; '.join(errors)}. Restore a good copy, "
            "or start afresh with another --workdir."
        )

    def close(self, raise_errors: bool = True) -> None:
        """Waits for pending saves and releases the manager.

        With `raise_errors=False` (while another error is propagating) a failed save is logged
        rather than raised, so it does not hide the original error.
        """
        try:
            self.wait()
        except CheckpointError as e:
            if raise_errors:
                self.manager.close()
                raise
            log.error("%s", e)
        self.manager.close()
