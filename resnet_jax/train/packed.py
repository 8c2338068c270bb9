"""Several seeds of one configuration trained in one compiled program ("packed" runs).

A CIFAR ResNet fills a fraction of a large accelerator, so the train states of R runs are stacked
along a leading run axis and the library's own train step is `vmap`ped over it
(`loop.jit_train_block(..., packed=True)`); the training split on the devices is shared. On a
multi-device mesh the run axis stays replicated and each run's batch is split over "data" as in a
single run.

Each packed run is the run it would be alone: its state starts from the same initialisation, its
batches are a function of (its seed, its step) and so bitwise those of the single run, and a step
changes its parameters as the single run's step does to float32 rounding (a batched convolution
sums in another order; over many steps SGD amplifies that rounding as it does between one and
eight devices, tests/test_packed.py). Each run writes its own run directory (config.json,
versions.json, metrics.jsonl, tensorboard/, checkpoints/, the dataset spec) with the single run's
layout, so `resnet-jax report`, `evaluate` and a resume (alone, or packed again) cannot tell the
difference.

Packed runs never use the oneDNN backend: under vmap its custom calls would run the seeds one
after another (`vmap_method="sequential"`), so where
`model.backend` is or resolves to "onednn" a pack trains with "xla_cpu" (XLA's convolutions, the
same values to float32 rounding) and says so.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import backends
from resnet_jax.config import ConfigError, resolve_steps_per_call, validate
from resnet_jax.data import Dataset, replicate
from resnet_jax.rundir.files import WriteError, atomic_write_json
from resnet_jax.rundir.spec import write_spec
from resnet_jax.train.checkpoint import Checkpointer
from resnet_jax.train.evaluation import evaluate_split
from resnet_jax.train.logger import MetricsLogger
from resnet_jax.train.loop import (
    DivergenceError,
    Preempted,
    _check_workdir,
    _flatten,
    _mean,
    check_resume_compatible,
    config_to_dict,
    jit_train_block,
    library_versions,
    make_mesh,
    training_parts,
)
from resnet_jax.train.pretrained import init_from_file
from resnet_jax.train.signals import StopSignals
from resnet_jax.train.state import DTYPES, TrainState, abstract_state, create_state
from resnet_jax.train.step import make_eval_step
from resnet_jax.train.workdir import (
    last_checkpoint_note,
    lock_workdir,
    refuse_lost_progress,
    restart_workdir,
)

# oneDNN's convolutions are custom calls without a batching (vmap) rule; this is the backend a
# pack takes instead (XLA's convolutions with the same CPU tuning).
UNPACKABLE_BACKEND, PACKED_BACKEND = "onednn", "xla_cpu"


def packed_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of one run's config as a packed run trains it: never the oneDNN backend."""
    config = config.copy_and_resolve_references()
    m = config.model
    if m.backend == UNPACKABLE_BACKEND or (
            m.backend == "auto"
            and backends.select("auto", dtype=DTYPES[m.dtype])[0] == UNPACKABLE_BACKEND):
        m.backend = PACKED_BACKEND
    return config


def _check_packable(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ConfigError unless the configs differ in `train.seed` only, with distinct seeds."""
    seeds = [c.train.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"packed runs need distinct seeds; got train.seed values {seeds}.")
    first = _flatten(config_to_dict(configs[0]))
    for c in configs[1:]:
        other = _flatten(config_to_dict(c))
        diffs = sorted(k for k in set(first) | set(other)
                       if k != "train.seed" and first.get(k) != other.get(k))
        if diffs:
            shown = "; ".join(f"{k}: {first.get(k)!r} vs {other.get(k)!r}" for k in diffs[:6])
            raise ConfigError(f"packed runs must share every config value but train.seed; "
                              f"these differ: {shown}. Train them separately.")


def make_stacker(sharding) -> Callable[[list[TrainState]], TrainState]:
    """`stack(states) -> state`: the runs' states along a new leading run axis, on `sharding`."""
    return jax.jit(lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states),
                   out_shardings=sharding)


def _taker(sharding) -> Callable[[TrainState, int], TrainState]:
    # The run index is traced, so picking any run reuses one compiled program.
    return jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree), out_shardings=sharding)


def train_packed(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | Path],
                 *, allow_config_change: bool = False, restart: bool = False,
                 dataset: Dataset | None = None, devices=None,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Trains (or resumes) the runs `configs[i]` -> `workdirs[i]` packed; returns their metrics.

    The configs must differ in `train.seed` only. `devices` (default: all) hold the pack: the run
    axis is replicated and each run's batch split over them, as in a single run; but XLA's SPMD
    partitioner gathers the activations of the vmapped convolutions, so a pack is fastest on one
    device. Runs resumed at different steps are packed in groups of equal step, one group after
    another. Each workdir is locked while the pack trains, and `restart` starts every run
    again from step 0, as `train_and_evaluate` does. Raises ConfigError, CheckpointError,
    DivergenceError (naming the run), WorkdirLockedError, WriteError like `train_and_evaluate`;
    `Preempted` after every run has saved on SIGTERM or Ctrl-C.
    """
    if len(configs) != len(workdirs) or not configs:
        raise ConfigError(f"train_packed needs one workdir per config; got {len(configs)} "
                          f"configs and {len(workdirs)} workdirs.")
    if log is None:
        log = (lambda text: print(text, flush=True)) if jax.process_index() == 0 else (
            lambda text: None)
    workdirs = [Path(w).absolute() for w in workdirs]
    if len(set(workdirs)) != len(workdirs):
        raise ConfigError(f"packed runs need distinct workdirs; got {[str(w) for w in workdirs]}.")
    mesh = make_mesh(devices)
    for c in configs:
        validate(c, num_devices=mesh.size)
    asked = configs[0].model.backend
    configs = [packed_config(c) for c in configs]
    for c in configs:
        c.train.steps_per_call = resolve_steps_per_call(c.train, jax.default_backend())
    _check_packable(configs)
    for w in workdirs:
        _check_workdir(w)
    with contextlib.ExitStack() as locks:
        for w in workdirs:
            locks.enter_context(lock_workdir(w))
        for w, c in zip(workdirs, configs, strict=True):
            if restart:
                restart_workdir(w, log)
            elif not allow_config_change:
                check_resume_compatible(w, c)
        return _train_packed(configs, workdirs, asked, dataset, mesh, log)


def _train_packed(configs: list[ml_collections.ConfigDict], workdirs: list[Path], asked: str,
                  dataset: Dataset | None, mesh, log: Callable[[str], None]) -> list[dict]:
    """The body of `train_packed`, run while holding every workdir's lock."""
    config = configs[0]
    t = config.train
    ds, schedule, tx, train_def, eval_def = training_parts(config, dataset)
    replicated = NamedSharding(mesh, P())
    names = [w.name for w in workdirs]
    backend, why = backends.select(config.model.backend, dtype=DTYPES[config.model.dtype])
    because = (f" instead of oneDNN (model.backend={asked!r}): under vmap oneDNN's custom calls "
               "would run the seeds one after another" if config.model.backend != asked
               else f" ({why})")
    log(f"Packing {len(configs)} runs ({', '.join(names)}) in one program, backend "
        f"{backend}{because}.")

    ckpts = [Checkpointer(w / "checkpoints", keep=t.keep_checkpoints,
                          async_save=t.async_checkpoints) for w in workdirs]
    loggers: list[MetricsLogger] = []
    try:
        # Each run starts as train_and_evaluate starts it (loop.py): restored, or created (and
        # initialised from train.init_from), then its directory written the same way.
        states, notes = [], []
        for c, ckpt in zip(configs, ckpts, strict=True):
            run_notes: list[str] = []
            if ckpt.latest_step() is not None:
                state = ckpt.restore(abstract_state(c, ds.spec, tx, replicated))
            else:
                refuse_lost_progress(ckpt.directory.parent, ckpt, c.train.checkpoint_every)
                state = create_state(c, ds.spec, tx, replicated)
                if c.train.get("init_from"):
                    state, run_notes = init_from_file(state, c, ds.spec, mesh)
            states.append(state)
            notes.append(run_notes)
        starts = [int(s.step) for s in states]
        if jax.process_index() == 0:
            versions = {**library_versions(), "backend": backend, "backend_reason": why}
            for w, c in zip(workdirs, configs, strict=True):
                atomic_write_json(w / "config.json", config_to_dict(c))
                atomic_write_json(w / "versions.json",
                                  {**versions, "packed_with": [n for n in names if n != w.name]})
                write_spec(w, ds.spec, ds.stats, c.data.normalization)
        # A progress bar per run would fight over the terminal: plain lines, labelled by run.
        loggers = [MetricsLogger(w, t.num_steps, s, t.batch_size, interactive=False,
                                 label=w.name) for w, s in zip(workdirs, starts, strict=True)]
        for lg, s, w, run_notes in zip(loggers, starts, workdirs, notes, strict=True):
            if s:
                lg.message(f"Resumed {w} from step {s}.")
            for note in run_notes:
                lg.message(note)
        runner = _PackedRunner(config, ds, mesh, train_def, eval_def, tx, schedule, ckpts,
                               loggers, workdirs)
        results: list[dict] = [{} for _ in configs]
        groups = sorted(set(starts))
        if len(groups) > 1:
            log(f"The runs are at different steps ({dict(zip(names, starts, strict=True))}): "
                "each group at one step is packed in turn.")
        for start in groups:
            idx = [i for i, s in enumerate(starts) if s == start]
            for i, r in zip(idx, runner.train([states[i] for i in idx], idx, start), strict=True):
                results[i] = r
        for lg in loggers:
            lg.close()  # here, so that a failing final flush still says where to resume from
        return results
    except WriteError as e:  # metrics or TensorBoard of one run: say where it can resume from
        run = next((i for i, w in enumerate(workdirs) if str(e).startswith(
            f"Could not write {w}/")), None)
        if run is None:
            raise
        raise WriteError(f"{e} {last_checkpoint_note(ckpts[run])}") from e
    finally:
        for lg in loggers:
            lg.close(raise_errors=sys.exc_info()[0] is None)
        # While another error propagates, a failing pending save is logged, not raised over it.
        for ckpt in ckpts:
            ckpt.close(raise_errors=sys.exc_info()[0] is None)


class _PackedRunner:
    """The packed loop: the compiled blocks, evaluation and per-run side effects of one pack."""

    def __init__(self, config, ds: Dataset, mesh, train_def, eval_def, tx, schedule,
                 ckpts: list[Checkpointer], loggers: list[MetricsLogger], workdirs: list[Path]):
        self.t = config.train
        self.ds, self.mesh = ds, mesh
        self.ckpts, self.loggers, self.workdirs = ckpts, loggers, workdirs
        replicated = NamedSharding(mesh, P())
        self.stack, self.take = make_stacker(replicated), _taker(replicated)
        self.data = replicate((ds.train_images, ds.train_labels, ds.stats), mesh)
        self.run_block = jit_train_block(config, train_def, tx, schedule, mesh,
                                         self.t.steps_per_call, packed=True)
        self.run_one = jit_train_block(config, train_def, tx, schedule, mesh, 1, packed=True)
        self.eval_step = jax.jit(make_eval_step(eval_def))
        self.splits = {"validation": (ds.validation_images, ds.validation_labels),
                       "test": (ds.test_images, ds.test_labels)}

    def evaluate(self, state: TrainState, run: int) -> dict:
        """One run's evaluation on `train.eval_splits`, logged to its directory."""
        results = {}
        for name in self.t.eval_splits:
            images, labels = self.splits[name]
            if len(images):
                r = evaluate_split(self.eval_step, state, images, labels, self.data[2],
                                   self.t.eval_batch_size, self.mesh)
                self.loggers[run].write(int(state.step), name, r)
                results[f"{name}_error"] = r["error"]
                results[f"{name}_loss"] = r["loss"]
        return results

    def check_health(self, packed: TrainState, runs: list[int]) -> None:
        """Raises DivergenceError naming the first run with too many non-finite steps in a row."""
        t = self.t
        bad_all = np.asarray(jax.device_get(packed.nonfinite_consecutive))
        for j, run in enumerate(runs):
            bad = int(bad_all[j])
            if bad >= t.max_consecutive_nonfinite:
                ckpt = self.ckpts[run]
                ckpt.wait()
                last = int(np.asarray(packed.step)[j])
                good = ckpt.latest_step()
                where = (f"Its last good checkpoint is step {good} in {ckpt.directory}"
                         if good is not None else "It has no checkpoint yet")
                raise DivergenceError(
                    f"Run {self.workdirs[run]} diverged at step {last - bad + 1}: the {bad} "
                    f"consecutive steps {last - bad + 1}..{last} had non-finite loss or "
                    f"gradients (skipped; config.train.max_consecutive_nonfinite="
                    f"{t.max_consecutive_nonfinite}). {where}; the other packed runs keep their "
                    "last checkpoints. Lower config.optim.learning_rate or set "
                    "config.optim.grad_clip_norm, then rerun to resume."
                )

    def train(self, states: list[TrainState], runs: list[int], start: int) -> list[dict]:
        """Trains the runs `runs` (all at step `start`) packed to `train.num_steps`."""
        t = self.t
        packed = self.stack(states)
        step, pending = start, []
        last_eval: list[dict] = [{} for _ in runs]
        with StopSignals() as stop:
            while step < t.num_steps:
                fn, k = (self.run_block, t.steps_per_call) if (
                    t.num_steps - step >= t.steps_per_call) else (self.run_one, 1)
                packed, metrics = fn(packed, self.data)
                step += k
                pending.append(metrics)
                done = step >= t.num_steps
                if step % t.log_every == 0 or done:
                    self.check_health(packed, runs)
                    host = jax.device_get(pending)
                    totals = np.asarray(jax.device_get(packed.nonfinite_total))
                    for j, run in enumerate(runs):
                        # Metrics are [steps, runs]: column j is run j's own record.
                        record = _mean([{n: m[:, j] for n, m in h.items()} for h in host])
                        record.update(self.loggers[run].timing(step))
                        record["nonfinite_total"] = int(totals[j])
                        self.loggers[run].write(step, "train", record)
                    pending = []
                evaluated = step % t.eval_every == 0 or done
                checkpoint = step % t.checkpoint_every == 0 or done or stop.received
                if evaluated or checkpoint:
                    # Let the train block finish first: on CPU, two different programs with
                    # collectives in flight at once can starve XLA's in-process rendezvous.
                    jax.block_until_ready(packed)
                if evaluated:
                    last_eval = [self.evaluate(self.take(packed, j), run)
                                 for j, run in enumerate(runs)]
                if checkpoint:
                    self.check_health(packed, runs)
                    for j, run in enumerate(runs):
                        best = {k: v for k, v in last_eval[j].items() if k == "validation_error"}
                        self.ckpts[run].save(self.take(packed, j),
                                             metrics=best if evaluated else None)
                if stop.received:
                    for run in runs:
                        self.ckpts[run].wait()
                    raise Preempted(step, stop.received)
        for run in runs:
            self.ckpts[run].wait()
        totals = np.asarray(jax.device_get(packed.nonfinite_total))
        return [{"step": step, **last_eval[j], "nonfinite_total": int(totals[j])}
                for j in range(len(runs))]
