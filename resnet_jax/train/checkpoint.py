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

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax.rundir.files import is_disk_full
from resnet_jax.train.state import TrainState

log = logging.getLogger(__name__)
BEST_METRIC = "validation_error"
MANIFEST = "resnet_jax_manifest.json"
# A step's items: the train state (Orbax's default item, so checkpoints written before the
# input iterator was saved restore unchanged) and the streaming input's Grain iterator state.
STATE_ITEM, DATA_ITEM = "default", "data"


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
    try:
        tmp.write_text(json.dumps({"files": files}, indent=1))
        os.replace(tmp, step_dir / MANIFEST)  # atomic: a kill leaves no half-written manifest
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave the checkpoint as Orbax wrote it
        raise


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
    if is_disk_full(e):
        # TensorStore's own message runs to several lines of database internals.
        where = f" at {e.filename}" if isinstance(e, OSError) and e.filename else ""
        return f"the disk is full (no space left on device{where})"
    # Orbax/TensorStore messages can run to many lines; the first one says what happened.
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _late_write_callback(unraisable) -> bool:
    """Whether an unraisable exception is a write callback arriving after its loop closed.

    When one TensorStore write of an async save fails (a full disk), Orbax stops waiting and
    closes its asyncio loop; the other writes' completion callbacks then raise "Event loop is
    closed" in TensorStore's threads, dozens of tracebacks after the failure we already report.
    """
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


def _abandoned_read(unraisable) -> bool:
    """Whether an unraisable exception is a shard read of a checkpoint whose restore already
    failed: Orbax drops the other reads' coroutines, and each reports itself when collected,
    after the one warning (or error) we give for that checkpoint."""
    return getattr(unraisable.object, "__name__", "") == "_read_array_index_and_device_put"


def _install_unraisable_filter() -> None:
    previous = sys.unraisablehook
    if getattr(previous, "_resnet_jax_filter", False):
        return

    def hook(unraisable) -> None:
        if not (_late_write_callback(unraisable) or _abandoned_read(unraisable)):
            previous(unraisable)

    hook._resnet_jax_filter = True
    sys.unraisablehook = hook


class Checkpointer:
    """Saves and restores `TrainState`s under `directory` (one sub-directory per step)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        _install_unraisable_filter()
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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           DATA_ITEM: grain.checkpoint.CheckpointHandler()})
        # Whether the last restore() also restored an input iterator's state.
        self.restored_data = False
        self._unverified: list[int] = []  # saved by us, manifest not yet written
        self._skipped: set[int] = set()  # unreadable steps that restore() walked past
        self._in_flight: int | None = None
        self._failure_raised = False  # a failed save was already reported to the caller

    def _fail(self, step: int | None, e: BaseException) -> CheckpointError:
        self._failure_raised = True
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

    def safe_latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None (also if the directory is unreadable)."""
        steps = self._safe_steps()
        return steps[-1] if steps else None

    @property
    def quarantine(self) -> Path:
        """Where unusable checkpoints are moved: `<checkpoints>.corrupt/`."""
        return self.directory.parent / f"{self.directory.name}.corrupt"

    def _no_usable(self, problems: list[str]) -> CheckpointError:
        workdir = self.directory.parent
        return CheckpointError(
            f"No usable checkpoint in {self.directory}: {'; '.join(problems)}. Restore a good "
            f"copy of {self.directory} (unusable ones are moved to {self.quarantine}/), or pass "
            f"--restart to start the run again from step 0 (the old run's files are moved to "
            f"{workdir / 'archive'}/)."
        )

    def raise_if_all_quarantined(self) -> None:
        """With no checkpoint left, raises the same error as the restore that moved them aside.

        So a rerun does not start silently from step 0 over a run whose checkpoints all failed.
        """
        if self._safe_steps() or not self.quarantine.is_dir():
            return
        # Newest step first, as restore() walked them, so the message reads the same.
        entries = sorted((p for p in self.quarantine.iterdir() if p.is_dir()),
                         key=lambda p: [-int(x) for x in p.name.split("-") if x.isdigit()])
        problems = []
        for p in entries:
            reason = p.with_name(p.name + ".reason")
            # Moved aside by an older version, which wrote no reason: name where it is.
            problems.append(reason.read_text().strip() if reason.is_file()
                            else f"checkpoint {p} is unusable")
        if problems:
            raise self._no_usable(problems)

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
                except OSError as e:
                    # The checkpoint is committed (restore works without a manifest), but the
                    # disk is failing: stop now rather than at the next save.
                    self._failure_raised = True
                    raise CheckpointError(
                        f"Could not write the checksum manifest of checkpoint {step_dir}: "
                        f"{_describe(e)}. The checkpoint itself is complete; free disk space, "
                        "then rerun the same command to resume from it.") from e

    def save(self, state: TrainState, metrics: dict | None = None, force: bool = False,
             data_iterator: grain.DatasetIterator | None = None) -> bool:
        """Starts saving `state` at its step (async); never writes non-finite parameters.

        `metrics` holding `validation_error` are stored with the step and rank it for
        `best_step()` and the retention of the best; other steps are kept only while recent.
        `data_iterator` (the streaming input's) has its position saved with the step.

        Raises CheckpointError when this or the previous (async) save could not be written.
        """
        step = int(state.step)
        if not _finite((state.params, state.batch_stats)):
            good = self._safe_steps()
            kept = (f"The last good checkpoint (step {good[-1]}) in {self.directory} is kept"
                    if good else "No checkpoint was written before that")
            raise CheckpointError(
                f"Training diverged: the parameters of step {step} are not finite (inf or NaN), "
                f"so they are not saved. {kept}. Lower config.optim.learning_rate or set "
                "config.optim.grad_clip_norm, then rerun."
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
            items = {STATE_ITEM: ocp.args.StandardSave(state.as_dict())}
            if data_iterator is not None:
                items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
            saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                      force=force)
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

    def _quarantine(self, step: int, problem: str = "") -> Path | None:
        """Moves an unusable checkpoint aside so the run can save that step again.

        `problem` (why it is unusable) is kept beside it in `<dest>.reason`, so that a rerun
        finding no checkpoint left can say the same thing.
        """
        if self.read_only or jax.process_index() != 0:
            return None
        dest = self.quarantine / f"{step}-{time.time_ns()}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
            if problem:
                dest.with_name(dest.name + ".reason").write_text(problem + "\n")
        except OSError:
            return None
        self.manager.reload()
        return dest

    def restore(self, target: TrainState, step: int | None = None,
                data_iterator: grain.DatasetIterator | None = None) -> TrainState:
        """Restores `step` (default: newest good one) into `target`'s structure and shardings.

        `target` may hold arrays or `jax.ShapeDtypeStruct`s. With no step given, a checkpoint
        that cannot be read is skipped with a warning and the previous one is tried. The saved
        input position, if the step has one, is restored into `data_iterator`
        (`restored_data` says whether it had).
        """
        self.restored_data = False
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target.as_dict(),
        )
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if step is not None and step not in self.steps():
            raise CheckpointError(
                f"No checkpoint for step {step} in {self.directory}; available: {self.steps()}."
            )
        errors, skipped = [], []
        for s in candidates:
            step_dir = self.directory / str(s)
            problem = verify_manifest(step_dir)
            corrupt = problem is not None
            if not corrupt:
                items = {STATE_ITEM: ocp.args.StandardRestore(abstract)}
                with_data = data_iterator is not None and (step_dir / DATA_ITEM).is_dir()
                if with_data:
                    items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
                try:
                    restored = self.manager.restore(s, args=ocp.args.Composite(**items))
                    restored = restored[STATE_ITEM]
                except Exception as e:  # noqa: BLE001 - any read failure means "not usable"
                    problem = f"it cannot be read ({_describe(e)})"
                else:
                    # Warned only now that there is something to fall back to; if nothing is
                    # usable, the one error below lists every problem instead.
                    for warning in skipped:
                        log.warning("%s; falling back to the previous checkpoint.", warning)
                    self.restored_data = with_data
                    return TrainState(**restored)
            msg = f"checkpoint {step_dir} is unusable: {problem}"
            errors.append(msg)
            if step is not None:
                raise CheckpointError(f"{msg}.")
            # Proven corrupt: move it aside now. A read failure may also mean a config that no
            # longer matches (--allow-config-change), so it stays until that step is saved again.
            moved = self._quarantine(s, msg) if corrupt else None
            if not corrupt:
                self._skipped.add(s)
            skipped.append(msg + (f" (moved to {moved})" if moved else ""))
        if not candidates:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        raise self._no_usable(errors)

    def close(self, raise_errors: bool = True) -> None:
        """Waits for pending saves and releases the manager.

        With `raise_errors=False` (while another error is propagating) a failed save is logged
        rather than raised, so it does not hide the original error.
        """
        already_reported = self._failure_raised
        error = None
        try:
            self.wait()
        except CheckpointError as e:
            error = e
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - Orbax re-raises the failed save here, again
            if error is None:
                error = CheckpointError(f"Could not close the checkpoints in {self.directory}: "
                                        f"{_describe(e)}.")
        if error is None or already_reported:
            return
        if raise_errors:
            raise error
        log.error("%s", error)
