"""The ablation grid: {plain, residual} x depths x seeds, one run directory each, resumable.

Each run lives in `ROOT/{kind}{depth}_seed{seed}/` and is an ordinary training run
(`resnet_jax.train.train_and_evaluate`), so `resnet-jax train` can resume or inspect any of them.
Re-running the grid skips runs whose final checkpoint exists and resumes the others from their
latest checkpoint, so a grid survives preemption: rerun the same command.

Parallelism (`parallel`):
  "data-parallel" (default): runs one after another in this process, each over all devices.
  "per-device": on a multi-GPU host, independent runs side by side, one per GPU: each run is a
      subprocess (`python -m resnet_jax.cli ablate ...` for that one run) with
      CUDA_VISIBLE_DEVICES set to its GPU. On CPU, or with one device, it falls back to in-process
      runs in sequence (parallel runs would only fight over the same cores).

Packing (`pack`): the seeds of one (kind, depth) are trained together in one compiled program
(`resnet_jax.train.packed`), each still writing its own run directory. Default: on a single
GPU/TPU, where one CIFAR ResNet leaves most of the device idle; not on CPU, where packing measured
slower (see `resolve_pack` and README, "Seeds packed on one accelerator").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from resnet_jax.config import ConfigError, apply_overrides, available_presets, get_preset, validate
from resnet_jax.rundir.lock import WorkdirLock

KINDS = {"plain": "cifar_plain", "residual": "cifar_resnet"}
FAMILY_KIND = {v: k for k, v in KINDS.items()}


def kind_name(kind: str) -> str:
    """The paper's word for a kind of net: "plain" or "ResNet"."""
    return "plain" if kind == "plain" else "ResNet"


def net_name(kind: str, depth: int) -> str:
    """The paper's name for a net: "plain-20", "ResNet-110"."""
    return f"{kind_name(kind)}-{depth}"
PARALLEL = ("data-parallel", "per-device")
DEFAULT_DEPTHS = (20, 32, 44, 56, 110)
DEFAULT_SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One cell of the grid."""

    kind: str  # "plain" or "residual"
    depth: int
    seed: int

    @property
    def name(self) -> str:
        """The run directory's name under the grid root."""
        return f"{self.kind}{self.depth}_seed{self.seed}"


def grid_specs(depths: Sequence[int], kinds: Sequence[str], seeds: Sequence[int]) -> list[RunSpec]:
    """All runs of the grid, shallow first (so the cheap rows of the table fill in first)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"--kinds {','.join(bad)} is not valid; choose from {', '.join(KINDS)}.")
    return [RunSpec(k, d, s) for d in depths for k in kinds for s in seeds]


def _base_config(preset: str, spec: RunSpec) -> ml_collections.ConfigDict:
    """The preset of one run: `{preset}_{resnet|plain}{depth}` if it exists, else `preset`."""
    stem = "resnet" if spec.kind == "residual" else "plain"
    specific = f"{preset}_{stem}{spec.depth}"
    if specific in available_presets():
        return get_preset(specific)
    if preset == "cifar10":
        # Depths without a preset file (e.g. 1202) still get the paper's recipe.
        from resnet_jax.configs._paper import paper_config

        return paper_config(KINDS[spec.kind], spec.depth)
    return get_preset(preset)


def run_config(preset: str, spec: RunSpec,
               overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The validated config of one grid run: the preset, its kind/depth/seed, then `overrides`.

    Unless overridden, every checkpoint is kept (`train.keep_checkpoints`), because the report's
    gradient-norm plot is computed at the saved checkpoints.
    """
    config = _base_config(preset, spec)
    config.model.family = KINDS[spec.kind]
    config.model.depth = spec.depth
    config.train.seed = spec.seed
    t = config.train
    t.keep_checkpoints = max(t.keep_checkpoints, -(-t.num_steps // t.checkpoint_every) + 1)
    apply_overrides(config, overrides)
    keys = [o.removeprefix("--").removeprefix("config.").split("=")[0] for o in overrides]
    for key in ("model.family", "model.depth", "train.seed"):
        if key in keys:
            raise ConfigError(f"--config.{key} is set by the grid; use --depths/--kinds/--seeds.")
    validate(config)
    return config


def resolve_pack(pack: bool | None, backend: str, num_devices: int) -> bool:
    """Whether the grid packs seeds: `pack` when given, else on one GPU/TPU only.

    Not on CPU: there a pack gives up oneDNN's convolutions and XLA's vmapped (grouped)
    convolutions are slower than one run after another. Not on several devices: the SPMD
    partitioner gathers the batch for the vmapped convolutions (train/packed.py).
    """
    if pack is not None:
        return pack
    return backend != "cpu" and num_devices == 1


def pack_groups(specs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """The runs grouped by (kind, depth), in order: the seeds of a group share one config."""
    groups: dict[tuple[str, int], list[RunSpec]] = {}
    for s in specs:
        groups.setdefault((s.kind, s.depth), []).append(s)
    return list(groups.values())


def finished_step(workdir: Path) -> int | None:
    """The newest complete checkpoint's step in a run directory (Orbax names them by step)."""
    ckpt = workdir / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()] if (
        ckpt.is_dir()) else []
    return max(steps) if steps else None


def is_finished(workdir: Path, config: ml_collections.ConfigDict) -> bool:
    """Whether the run in `workdir` reached `config.train.num_steps` (its final checkpoint)."""
    step = finished_step(workdir)
    return step is not None and step >= config.train.num_steps


def _data_key(config: ml_collections.ConfigDict) -> str:
    return json.dumps(json.loads(config.data.to_json()), sort_keys=True)


def run_grid(preset: str, root: str | Path, depths: Sequence[int] = DEFAULT_DEPTHS,
             kinds: Sequence[str] = tuple(KINDS), seeds: Sequence[int] = DEFAULT_SEEDS,
             overrides: Sequence[str] = (), *, parallel: str = "data-parallel",
             pack: bool | None = None, restart: bool = False, lock: bool = True,
             dataset=None, interactive: bool | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Trains every unfinished run of the grid; returns {"ran": [names], "skipped": [names]}.

    `pack`: train the unfinished seeds of each (kind, depth) packed in one program (None: on
    GPU/TPU, not on CPU; see `resolve_pack`). `dataset` (optional) is used for every run whose
    data config it was loaded with; otherwise each distinct data config is loaded once.
    `restart` starts unfinished runs again from step 0. The grid root is locked against a second
    `ablate` (`lock=False`: the caller holds it). Raises `resnet_jax.train.Preempted` on SIGTERM
    or SIGINT (the interrupted run has saved a checkpoint; rerun to resume).
    """
    if parallel not in PARALLEL:
        raise ConfigError(f"--parallel {parallel!r} is not valid; choose one of {PARALLEL}.")
    if not (depths and kinds and seeds):
        raise ConfigError(f"The grid is empty (depths {list(depths)}, kinds {list(kinds)}, seeds "
                          f"{list(seeds)}); give at least one of each.")
    root = Path(root).absolute()
    specs = grid_specs(depths, kinds, seeds)
    configs = {s: run_config(preset, s, overrides) for s in specs}  # fail fast on a bad override
    with WorkdirLock(root, what="ablate") if lock else contextlib.nullcontext():
        return _run_specs(preset, root, specs, configs, overrides, parallel, pack, restart,
                          dataset, interactive, log)


def _run_specs(preset: str, root: Path, specs: list[RunSpec], configs: dict, overrides,
               parallel: str, pack: bool | None, restart: bool, dataset,
               interactive: bool | None, log: Callable[[str], None]) -> dict:
    """`run_grid` after validation, while holding the grid's lock."""
    todo = [s for s in specs if not is_finished(root / s.name, configs[s])]
    skipped = [s.name for s in specs if s not in todo]
    if skipped:
        log(f"Finished already, skipped: {', '.join(skipped)}")
    if parallel == "per-device":
        gpus = _gpu_count()
        if gpus > 1:
            _run_per_device(preset, root, todo, overrides, gpus, log, restart)
            return {"ran": [s.name for s in todo], "skipped": skipped}
        log("per-device: fewer than 2 GPUs here, so the runs go in sequence in this process.")
    import jax

    from resnet_jax.data import load_dataset
    from resnet_jax.train import train_and_evaluate
    from resnet_jax.train.packed import train_packed

    groups = (pack_groups(todo) if resolve_pack(pack, jax.default_backend(), jax.device_count())
              else [[s] for s in todo])
    # Simulated CPU devices share the same cores: a pack there runs on one of them, as XLA's
    # partitioner gathers the batch for vmapped convolutions (9x slower steps measured on 8).
    pack_devices = jax.devices()[:1] if jax.default_backend() == "cpu" else None
    datasets = {} if dataset is None else {"given": dataset}
    ran = []
    for i, group in enumerate(groups):
        config = configs[group[0]]
        key = _data_key(config)
        if key not in datasets:
            # A passed-in dataset is trusted for every run (tests); else load once per data config.
            datasets[key] = datasets["given"] if "given" in datasets else load_dataset(config.data)
        names = ", ".join(s.name for s in group)
        seeds = ",".join(str(s.seed) for s in group)
        log(f"[{i + 1}/{len(groups)}] {names}: {config.model.family} depth {group[0].depth}, "
            f"seed{'s' if len(group) > 1 else ''} {seeds}"
            f"{' packed' if len(group) > 1 else ''}, {config.train.num_steps} steps -> {root}")
        start = time.time()
        if len(group) > 1:
            train_packed([configs[s] for s in group], [root / s.name for s in group],
                         dataset=datasets[key], devices=pack_devices, log=log, restart=restart)
        else:
            train_and_evaluate(config, root / group[0].name, dataset=datasets[key],
                               interactive=interactive, restart=restart)
        log(f"[{i + 1}/{len(groups)}] {names} done in {time.time() - start:.0f} s")
        ran += [s.name for s in group]
    return {"ran": ran, "skipped": skipped}


def _gpu_count() -> int:
    """GPUs visible to a fresh process (asked in a subprocess so this one grabs no GPU memory)."""
    code = "import jax; print(jax.default_backend(), jax.local_device_count())"
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=300, check=True).stdout.split()
    except (subprocess.SubprocessError, OSError):
        return 0
    return int(out[-1]) if out and out[-2] in ("gpu", "cuda", "rocm") else 0


def _run_per_device(preset: str, root: Path, todo: list[RunSpec], overrides: Sequence[str],
                    num_gpus: int, log: Callable[[str], None], restart: bool = False) -> None:
    """Runs each spec in its own subprocess pinned to one free GPU, `num_gpus` at a time."""
    pending, running, failed = list(todo), {}, []
    while pending or running:
        free = [g for g in range(num_gpus) if g not in running]
        while free and pending:
            gpu, spec = free.pop(0), pending.pop(0)
            workdir = root / spec.name
            workdir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "resnet_jax.cli", "ablate", "--config", preset,
                   "--workdir", str(root), "--depths", str(spec.depth), "--kinds", spec.kind,
                   "--seeds", str(spec.seed), "--parallel", "data-parallel", "--grid-lock-held",
                   *(["--restart"] if restart else []), *overrides]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            logfile = open(workdir / "ablate.log", "a")  # noqa: SIM115 - closed when it ends
            log(f"GPU {gpu}: {spec.name} (log: {workdir / 'ablate.log'})")
            proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT)
            running[gpu] = (spec, proc, logfile)
        time.sleep(5)
        for gpu, (spec, proc, logfile) in list(running.items()):
            if proc.poll() is not None:
                logfile.close()
                del running[gpu]
                if proc.returncode:
                    failed.append(spec.name)
                log(f"GPU {gpu}: {spec.name} exited with {proc.returncode}")
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)}; see ablate.log in their workdirs; "
                           "rerun the same command to resume them.")
