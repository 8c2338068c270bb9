"""The training run: resolve config, build state, resume, loop, evaluate, checkpoint, log.

Everything with side effects lives here; the jitted core is in `step.py`.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import backends
from resnet_jax.config import ConfigError, load_run_config, resolve_steps_per_call, validate
from resnet_jax.data import AugmentConfig, Dataset, DataSpec, NormStats, load_dataset
from resnet_jax.rundir.files import WriteError, atomic_write_json
from resnet_jax.rundir.spec import SpecError, read_spec, write_spec
from resnet_jax.train.checkpoint import Checkpointer
from resnet_jax.train.evaluation import evaluate_batches
from resnet_jax.train.inputs import open_input
from resnet_jax.train.logger import MetricsLogger
from resnet_jax.train.optim import make_optimizer, make_schedule
from resnet_jax.train.pretrained import init_from_file
from resnet_jax.train.signals import EXIT_CODES, StopSignals
from resnet_jax.train.state import (
    DTYPES,
    TrainState,
    abstract_state,
    create_state,
    graphdefs,
)
from resnet_jax.train.step import StepConfig, make_eval_step, make_multi_step, make_train_step
from resnet_jax.train.workdir import (
    last_checkpoint_note,
    lock_workdir,
    refuse_lost_progress,
    restart_workdir,
)

# Keys a resumed run may change: they affect logging and bookkeeping, not the trajectory.
RESUMABLE_CHANGES = {
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_batch_size",
    "train.eval_splits", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.steps_per_call", "data.data_dir", "data.source",
    "data.cache_dir", "data.decode_workers", "data.stream_threads", "data.stats_images",
    "model.backend", "model.conv_impl",  # the same maths by other kernels (conv_impl: old runs)
}


class DivergenceError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


class Preempted(Exception):  # noqa: N818 - a signal, not an error
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run can be resumed.

    `args` are `(step, signal number)`; `exit_code` is what a shell reports for that signal.
    """

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(step, signum)
        self.step, self.signum = step, signum

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C (SIGINT), 143 after SIGTERM."""
        return EXIT_CODES.get(self.signum, 128 + self.signum)

    def __str__(self) -> str:
        what = "Interrupted (Ctrl-C)" if self.signum == signal.SIGINT else "Preempted"
        return (f"{what} at step {self.step}; checkpoint saved. Rerun the same command to "
                "resume.")


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of every host) with the batch axis named "data"."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def jit_train_block(config: ml_collections.ConfigDict, train_def, tx, schedule, mesh: Mesh,
                    num_steps: int, *, packed: bool = False, streamed: bool = False) -> Callable:
    """`run(state, data) -> (state, metrics)`: `num_steps` train steps in one jitted call.

    The state is donated (updated in place) and stays replicated; `data` is the resident
    `(images_u8, labels, stats)` of the training split, or with `streamed` the block's batches
    `(images [num_steps, B, ...], labels [num_steps, B], stats)`. The bench times this same
    function. `packed`: the state has a leading axis of independent runs (seeds,
    train/packed.py) that share `data`; metrics then come back as [num_steps, runs].
    """
    t = config.train
    aug = AugmentConfig.from_config(config.data)
    if streamed and config.data.get("image_size") is not None:
        aug = AugmentConfig(pad=0, crop=False, flip=False)  # cropped and flipped on the host
    step_cfg = StepConfig(batch_size=t.batch_size, aug=aug, dynamic_loss_scale=t.loss_scale > 0,
                          streamed=streamed)
    train_step = make_train_step(train_def, tx, schedule, step_cfg, mesh)
    if packed:
        train_step = jax.vmap(train_step, in_axes=(0, None))
    return jax.jit(make_multi_step(train_step, num_steps, streamed), donate_argnums=0,
                   out_shardings=(NamedSharding(mesh, P()), None))


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when launched as one of several processes.

    Triggered by JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or by
    RESNET_JAX_DISTRIBUTED=1 on clusters that JAX auto-detects (Slurm, Cloud TPU, ...).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("RESNET_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The resolved config as plain JSON-able data."""
    return json.loads(config.to_json())


def check_resume_compatible(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError if `workdir` holds a run whose trajectory-defining config differs."""
    if not (workdir / "config.json").exists():
        return
    # Over today's defaults, so a key added since the run was made does not count as a change.
    try:
        saved = load_run_config(workdir)
    except ConfigError as e:
        raise ConfigError(f"{e} Or pass --allow-config-change to resume it with this command's "
                          "config.") from None
    old = _flatten(config_to_dict(saved))
    new = _flatten(config_to_dict(config))
    diffs = sorted(k for k in set(old) | set(new)
                   if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if diffs:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs[:6])
        raise ConfigError(
            f"workdir {workdir} holds a run with a different config ({shown}). Use another "
            "--workdir, or pass --allow-config-change to resume it with the new values."
        )


def library_versions() -> dict:
    """Versions of the libraries a result depends on, and the devices it ran on."""
    import flax
    import optax
    import orbax.checkpoint

    return {
        "python": platform.python_version(), "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__, "optax": optax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__,
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count(),
        "host_cpu": backends.cpu_model(),
    }


def _check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # One probe per process: with several processes the names must not collide.
        probe = workdir / f".write_probe.{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable ({e.strerror}); choose a "
                          "directory you can write to.") from None


def _mean(records: list[dict]) -> dict:
    stacked = jax.device_get(records)
    return {k: float(np.mean(np.concatenate([np.ravel(r[k]) for r in stacked])))
            for k in stacked[0] if k != "finite"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       allow_config_change: bool = False, restart: bool = False,
                       dataset: Dataset | None = None,
                       interactive: bool | None = None) -> dict:
    """Trains (or resumes) the run in `workdir` to `config.train.num_steps`; returns final metrics.

    The run directory receives `config.json`, `versions.json`, `metrics.jsonl`, `tensorboard/`
    and `checkpoints/`, and is locked against a second run while this one lives. `restart`
    moves an earlier run's files to `workdir/archive/` and starts from step 0. Raises
    ConfigError, DatasetNotFoundError, CheckpointError, DivergenceError, WorkdirLockedError,
    WriteError with a message for the user; `Preempted` after saving on SIGTERM or SIGINT.
    """
    workdir = Path(workdir).absolute()
    mesh = make_mesh()
    validate(config, num_devices=mesh.size)
    # Validated first, so a bad interval is a ConfigError; auto then divides the intervals.
    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    config.train.steps_per_call = resolve_steps_per_call(config.train, jax.default_backend())
    _check_workdir(workdir)
    with lock_workdir(workdir):
        if restart:
            restart_workdir(workdir, print)
        elif not allow_config_change:
            check_resume_compatible(workdir, config)
        return _train(config, workdir, mesh, dataset, interactive)


def model_parts(config: ml_collections.ConfigDict, spec: DataSpec):
    """(lr schedule, optimiser, train graphdef, eval graphdef) of a run's config and data."""
    t = config.train
    schedule = make_schedule(config.optim, t.batch_size, t.num_steps)
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    return (schedule, tx, *graphdefs(config, spec))


def training_parts(config: ml_collections.ConfigDict, dataset: Dataset | None = None):
    """(dataset, lr schedule, optimiser, train graphdef, eval graphdef) of a run's config; the
    dataset is loaded unless given."""
    ds = dataset if dataset is not None else load_dataset(config.data)
    return (ds, *model_parts(config, ds.spec))


def _resumed_stats(workdir: Path, ckpt: Checkpointer) -> NormStats | None:
    """The normalisation statistics a run being resumed trained with (None for a new run):
    a stream would otherwise estimate them again from a sample of images."""
    if ckpt.latest_step() is None:
        return None
    try:
        saved = read_spec(workdir)
    except SpecError:
        return None
    return None if saved is None else saved[1]


def _train(config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh,
           dataset: Dataset | None, interactive: bool | None) -> dict:
    """The body of `train_and_evaluate`, run while holding the workdir's lock."""
    t = config.train
    replicated = NamedSharding(mesh, P())

    ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints,
                        async_save=t.async_checkpoints)
    logger = inputs = None
    try:
        inputs = open_input(config, mesh, dataset, _resumed_stats(workdir, ckpt), load_dataset)
        spec = inputs.spec
        schedule, tx, train_def, eval_def = model_parts(config, spec)
        notes: list[str] = []
        if ckpt.latest_step() is not None:
            # Restore into an abstract target: a bad checkpoint is reported before any compile.
            state = ckpt.restore(abstract_state(config, spec, tx, replicated),
                                 data_iterator=inputs.iterator)
        else:
            refuse_lost_progress(workdir, ckpt, t.checkpoint_every)
            state = create_state(config, spec, tx, replicated)
            if t.get("init_from"):
                state, notes = init_from_file(state, config, spec, mesh)
        start = int(state.step)
        inputs.seek(start, restored=ckpt.restored_data)
        backend, why = backends.select(config.model.backend, dtype=DTYPES[config.model.dtype])
        if jax.process_index() == 0:
            atomic_write_json(workdir / "config.json", config_to_dict(config))
            atomic_write_json(workdir / "versions.json",
                              {**library_versions(), "backend": backend, "backend_reason": why,
                               "pipeline": "stream" if inputs.streamed else "device"})
            # What predict/export/load need of the data, so they work once it is gone.
            write_spec(workdir, spec, inputs.stats, config.data.normalization)
        logger = MetricsLogger(workdir, t.num_steps, start, t.batch_size, interactive)
        if start:
            logger.message(f"Resumed {workdir} from step {start}.")
        for note in [*notes, inputs.note]:
            if note:
                logger.message(note)
        if why.startswith("not oneDNN") and config.model.backend == "auto" and mesh.size == 1:
            logger.message(f"Backend xla_cpu: {why}.")
        streamed = inputs.streamed
        run_block = jit_train_block(config, train_def, tx, schedule, mesh, t.steps_per_call,
                                    streamed=streamed)
        run_one = jit_train_block(config, train_def, tx, schedule, mesh, 1, streamed=streamed)
        eval_step = jax.jit(make_eval_step(eval_def))

        def evaluate(state: TrainState) -> dict:
            results = {}
            for name in t.eval_splits:
                if inputs.eval_size(name):
                    r = evaluate_batches(eval_step, state,
                                         inputs.eval_batches(name, t.eval_batch_size),
                                         inputs.stats_on_device, inputs.eval_size(name))
                    logger.write(int(state.step), name, r)
                    results[f"{name}_error"] = r["error"]
                    results[f"{name}_loss"] = r["loss"]
            return results

        def check_health(state: TrainState) -> None:
            bad = int(state.nonfinite_consecutive)
            if bad >= t.max_consecutive_nonfinite:
                ckpt.wait()
                last = int(state.step)
                good = ckpt.latest_step()
                where = (f"The last good checkpoint is step {good} in {ckpt.directory} (not "
                         "overwritten)" if good is not None else "There is no checkpoint yet")
                raise DivergenceError(
                    f"Training diverged at step {last - bad + 1}: the {bad} consecutive steps "
                    f"{last - bad + 1}..{last} had non-finite loss or gradients (skipped, not "
                    f"applied; config.train.max_consecutive_nonfinite="
                    f"{t.max_consecutive_nonfinite}). {where}. Lower config.optim.learning_rate "
                    "or set config.optim.grad_clip_norm, then rerun to resume from it."
                )

        step, pending = start, []
        last_eval: dict = {}
        with StopSignals() as stop:
            while step < t.num_steps:
                fn, k = (run_block, t.steps_per_call) if (
                    t.num_steps - step >= t.steps_per_call) else (run_one, 1)
                state, metrics = fn(state, inputs.block(k))
                step += k
                pending.append(metrics)
                done = step >= t.num_steps
                if step % t.log_every == 0 or done:
                    check_health(state)
                    record = _mean(pending)
                    record.update(logger.timing(step))
                    record["nonfinite_total"] = int(state.nonfinite_total)
                    logger.write(step, "train", record)
                    pending = []
                if step % t.eval_every == 0 or done:
                    last_eval = evaluate(state)
                if step % t.checkpoint_every == 0 or done or stop.received:
                    check_health(state)
                    evaluated = step % t.eval_every == 0 or done
                    ckpt.save(state, metrics={k: v for k, v in last_eval.items()
                                              if k == "validation_error"} if evaluated else None,
                              data_iterator=inputs.iterator)
                if stop.received:
                    ckpt.wait()
                    raise Preempted(step, stop.received)
        ckpt.wait()
        logger.close()  # here, so that a failing final flush still says where to resume from
        return {"step": step, **last_eval, "nonfinite_total": int(state.nonfinite_total)}
    except WriteError as e:  # metrics or TensorBoard: say where the run can resume from
        raise WriteError(f"{e} {last_checkpoint_note(ckpt)}") from e
    finally:
        if inputs is not None:
            inputs.close()
        if logger is not None:
            logger.close(raise_errors=sys.exc_info()[0] is None)
        # While another error propagates, a failing pending save is logged, not raised over it.
        ckpt.close(raise_errors=sys.exc_info()[0] is None)


def _restore_state(workdir: Path, config: ml_collections.ConfigDict, spec, step: int | None,
                   best: bool, devices):
    mesh = make_mesh(devices)
    t = config.train
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    _, eval_def = graphdefs(config, spec)
    target = abstract_state(config, spec, tx, NamedSharding(mesh, P()))
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        if best:
            step = ckpt.best_step()
            if step is None:
                raise ConfigError(
                    f"{workdir} has no checkpoint saved with a validation error (one is stored "
                    "when a checkpoint falls on an evaluation of the validation split; older "
                    f"versions stored none); use --step N (available: {ckpt.steps()}) or the "
                    "latest.")
        state = ckpt.restore(target, step)
    finally:
        ckpt.close()
    return state, eval_def, mesh


def restore_model(workdir: str | Path, step: int | None = None, best: bool = False,
                  devices=None):
    """Restores a run's model without its training data: (config, spec, stats, state, eval
    graphdef, mesh).

    The dataset spec and normalisation statistics come from the run directory
    (`resnet_jax/rundir/spec.py`); a run written before those files existed loads its dataset
    to recompute them, so it needs the data.
    """
    workdir = Path(workdir).absolute()
    config = load_run_config(workdir)
    saved = read_spec(workdir)
    if saved is None:
        ds = load_dataset(config.data)
        saved = ds.spec, ds.stats
    spec, stats = saved
    state, eval_def, mesh = _restore_state(workdir, config, spec, step, best, devices)
    return config, spec, stats, state, eval_def, mesh


def restore_run(workdir: str | Path, step: int | None = None, best: bool = False,
                devices=None):
    """Restores a finished or running run: returns (config, dataset, state, eval graphdef, mesh).

    Loads the run's dataset (for analyses that need its images); `restore_model` does without.
    The state is replicated over a mesh of `devices` (default: all); analyses of small models
    pass one device, which compiles faster than an SPMD program over many.
    """
    workdir = Path(workdir).absolute()
    config = load_run_config(workdir)
    ds = load_dataset(config.data)
    state, eval_def, mesh = _restore_state(workdir, config, ds.spec, step, best, devices)
    return config, ds, state, eval_def, mesh
