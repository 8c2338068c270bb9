"""The benchmark proper: compile, time (interleaved with the PyTorch twin), analyse, report.

Import this only after `resnet_jax.backends.xla_flags.configure_cpu` has run (it imports jax).
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.bench import measure
from resnet_jax.config import AUTO_STEPS_PER_CALL
from resnet_jax.models import parse_name
from resnet_jax.train.loop import make_mesh

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class BenchConfig:
    """What to measure; see `resnet_jax.bench.cli` for the command-line flags."""

    models: list[str]
    compile_only_models: list[str]
    batch_size: int = 128
    dtypes: list[str] = dataclasses.field(default_factory=lambda: ["float32"])
    vs_torch: bool = False
    windows: int = 5
    train_steps: int = 5
    eval_steps: int = 10
    warmup: int = 2
    # Timed models run unrolled stages: on XLA:CPU a scanned stage runs slower (ResNet-56: 0.86x,
    # paired; docs/performance.md). Compile-only models are always scanned (flat compile time).
    scan_blocks: bool = False
    remat: str = "auto"  # "auto": remat for depth > 110 (memory), "on", "off"
    data_steps: int = 50
    run_compile_only: bool = False
    # >0: also time the library's own train step (data resident on the devices, augmentation
    # in the step) run `steps_per_call` steps per host call, as `resnet-jax train` runs it.
    # None: AUTO_STEPS_PER_CALL on GPU/TPU, off on CPU (as the training loop's auto).
    steps_per_call: int | None = None
    loop_calls: int = 2  # host calls per timed window of the loop rows
    backend: str = "auto"  # the layers' implementation (resnet_jax.backends)
    # ImageNet-family models (resnet18..152) train on streamed `image_size` px batches.
    image_size: int = 224
    # The streaming input pipeline's rows (resnet_jax.bench.input_pipeline): a class folder of
    # the user's, else `input_images` generated JPEGs; threads None: one per CPU.
    input_pipeline: bool = True
    input_dir: str | None = None
    input_images: int = 256
    input_threads: int | None = None
    input_batches_per_thread: int = 3


def torch_device() -> str:
    """Where the PyTorch twin runs: on the GPU when JAX runs on one, else on the CPU."""
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def _depth(name: str) -> int:
    return parse_name(name)[1]


def streams(name: str) -> bool:
    """True for the ImageNet families: their train step takes streamed batches (the host
    decodes and crops; `imagenet_resnet50` preset), not a resident split."""
    return parse_name(name)[0].startswith("imagenet_")


def _remat(cfg: BenchConfig, name: str) -> bool:
    return cfg.remat == "on" or (cfg.remat == "auto" and _depth(name) > 110)


class TorchTwin:
    """The PyTorch twin (benchmarks/torch_resnet.py, not part of the library) in a child process.

    `window(kind, steps)` runs `steps` train or eval steps there and returns seconds per step.
    A separate process, driven in lockstep, keeps the two frameworks' thread pools apart: in one
    process torch's spin-waiting OpenMP threads slowed XLA's step by ~30% (and XLA's slowed
    torch), which measured the co-hosting, not either framework. The child inherits this
    process's environment (GLIBC_TUNABLES included), so both run under the same settings.
    """

    def __init__(self, name: str, batch_size: int, *, device: str = "cpu",
                 dtype: str = "float32", compile: bool = False):
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_resnet.py"
        if not path.exists():
            raise FileNotFoundError(f"--vs-torch needs {path} (run from a source checkout)")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, str(path), "--serve", str(_depth(name)), str(batch_size), device,
             dtype, "compile" if compile else "eager"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        ready = self._proc.stdout.readline().split(maxsplit=1)
        if not ready or ready[0] != "ready":
            self._fail("could not start")
        self.precision = ready[1].strip() if len(ready) > 1 else "?"  # of its convolutions

    def _fail(self, what: str):
        self._proc.kill()
        self._stderr.seek(0)
        tail = self._stderr.read()[-2000:]
        raise RuntimeError(f"--vs-torch: the PyTorch twin {what} (is torch installed? "
                           f"pip install torch==2.13.0, the [bench] extra):\n{tail}")

    def window(self, kind: str, steps: int) -> float:
        """Mean seconds per step of `steps` PyTorch `kind` ("train" or "eval") steps."""
        self._proc.stdin.write(f"{kind} {steps}\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            self._fail("stopped")
        return float(line)

    def close(self) -> None:
        """Stops the child process."""
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._stderr.close()


class _Compiled:
    """A jitted step lowered and compiled once, with the time each phase took."""

    def __init__(self, jitted, *args):
        t = time.perf_counter()
        self.lowered = lowered = jitted.lower(*args)
        self.lower_s = time.perf_counter() - t
        t = time.perf_counter()
        self.fn = lowered.compile()
        self.compile_s = time.perf_counter() - t
        self.total_s = self.lower_s + self.compile_s


def _analysis(compiled: _Compiled, n_devices: int, flops_from=None) -> dict[str, Any]:
    # The lowered (whole-program, pre-partitioning) module's cost first: after GPU compilation
    # convolutions are cuDNN custom calls that XLA's cost analysis does not count. The compiled
    # analysis describes one device's share of the SPMD program. oneDNN's convolutions are
    # custom calls from the start: `flops_from` is then the same step lowered with XLA's.
    flops = measure.cost_flops(flops_from if flops_from is not None else compiled.lowered)
    if not flops:
        flops = measure.cost_flops(compiled.fn)
        flops = flops * n_devices if flops else None
    return {
        "lower_s": compiled.lower_s,
        "compile_s": compiled.compile_s,
        "trace_and_compile_s": compiled.total_s,
        "flops_per_step": flops,
        "bytes_per_step": measure.cost_bytes(flops_from if flops_from is not None
                                             else compiled.lowered),
        "xla_memory_per_device": measure.memory_analysis(compiled.fn),
    }


@dataclasses.dataclass
class LibraryStep:
    """The library's train and eval steps for one model, as `resnet-jax train` builds them."""

    config: Any
    mesh: Any
    state: Any
    data: tuple
    train_block: Callable[[int], Any]  # steps per call -> the jitted `jit_train_block`
    eval_step: Any  # jitted `eval_step(state, x_u8, y, mask, stats)`
    backend: str
    # `data` is one streamed batch `(images [1, B, S, S, C], labels [1, B], stats)` (ImageNet
    # families), not a resident split.
    streamed: bool = False


def step_config(cfg: BenchConfig, name: str, dtype: str, *, scan_blocks: bool, remat: bool,
                backend: str | None = None):
    """The training config the bench times `name` with: its paper preset (CIFAR), or for the
    ImageNet families the `imagenet_resnet50` preset at `cfg.image_size` px; the bench's
    dtype, batch size and layer options over it."""
    from resnet_jax.configs._paper import paper_config

    family, depth = parse_name(name)[:2]
    if streams(name):
        from resnet_jax.configs.imagenet_resnet50 import get_config as imagenet_config

        config = imagenet_config()
        config.model.family = family
        config.model.depth = depth
        config.data.image_size = cfg.image_size
    else:
        config = paper_config(family, depth)
    config.model.dtype = dtype
    config.model.scan_blocks = scan_blocks
    config.model.remat = remat
    config.model.backend = backend or cfg.backend
    config.train.batch_size = cfg.batch_size
    return config


def synthetic_data(cfg: BenchConfig, streamed: bool, mesh, num_train: int) -> tuple:
    """(spec, data) of random uint8 images on the devices: a resident 32x32 CIFAR-like split of
    `num_train` images, or with `streamed` one ImageNet-like batch of `cfg.image_size` px as
    the streaming pipeline delivers it, `(images [1, B, S, S, 3], labels [1, B], stats)`."""
    from resnet_jax.data import DataSpec, replicate
    from resnet_jax.data.preprocess import NormStats, imagenet_stats

    rng = np.random.RandomState(0)
    if streamed:
        size, classes = cfg.image_size, 1000
        spec = DataSpec("synthetic", "random", classes, (size, size, 3),
                        tuple(map(str, range(classes))), num_train, 0, 0)
        images = rng.randint(0, 256, (1, cfg.batch_size, size, size, 3), np.uint8)
        labels = rng.randint(0, classes, (1, cfg.batch_size)).astype(np.int32)
        # Placed as resnet_jax.train.inputs.StreamInput.block places a block of batches.
        return spec, (*jax.device_put((images, labels), NamedSharding(mesh, P(None, "data"))),
                      replicate(imagenet_stats(3), mesh))
    spec = DataSpec("synthetic", "random", 10, (32, 32, 3), tuple(map(str, range(10))),
                    num_train, 0, 0)
    images = rng.randint(0, 256, (num_train, 32, 32, 3), np.uint8)
    labels = rng.randint(0, 10, num_train).astype(np.int32)
    stats = NormStats(np.full((32, 32, 3), 120.0, np.float32), np.full((3,), 64.0, np.float32))
    return spec, replicate((images, labels, stats), mesh)


def library_step(cfg: BenchConfig, name: str, dtype: str, *, scan_blocks: bool, remat: bool,
                 backend: str | None = None, num_train: int = 4096) -> LibraryStep:
    """The paper preset of `name` with the bench's overrides, its state on the devices and a
    synthetic uint8 training split resident there (crop+flip run inside the step, as in
    training). The timed function is `resnet_jax.train.loop.jit_train_block` itself.

    ImageNet families (resnet18..152) take the `imagenet_resnet50` preset instead (1000 classes,
    its optimiser), at `cfg.image_size` px, and `data` is one synthetic streamed batch on the
    devices, as the streaming pipeline delivers it (already cropped and flipped on the host).
    """
    from resnet_jax.backends import select
    from resnet_jax.train.loop import jit_train_block
    from resnet_jax.train.loop import make_mesh as train_mesh
    from resnet_jax.train.optim import make_optimizer, make_schedule
    from resnet_jax.train.state import DTYPES as MODEL_DTYPES
    from resnet_jax.train.state import create_state, graphdefs
    from resnet_jax.train.step import make_eval_step

    config = step_config(cfg, name, dtype, scan_blocks=scan_blocks, remat=remat,
                         backend=backend)
    streamed = streams(name)
    t = config.train
    mesh = train_mesh()
    spec, data = synthetic_data(cfg, streamed, mesh, num_train)
    schedule = make_schedule(config.optim, t.batch_size, t.num_steps)
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    train_def, eval_def = graphdefs(config, spec)
    state = create_state(config, spec, tx, NamedSharding(mesh, P()))
    resolved, _ = select(config.model.backend, dtype=MODEL_DTYPES[dtype])
    return LibraryStep(
        config, mesh, state, data,
        lambda k: jit_train_block(config, train_def, tx, schedule, mesh, k, streamed=streamed),
        jax.jit(make_eval_step(eval_def)), resolved, streamed)


def _eval_batch(lib: LibraryStep, batch_size: int) -> tuple:
    rep = NamedSharding(lib.mesh, P("data"))
    x = jax.device_put(lib.data[0][0] if lib.streamed else lib.data[0][:batch_size], rep)
    y = jax.device_put(lib.data[1][0] if lib.streamed else lib.data[1][:batch_size], rep)
    return x, y, jax.device_put(jnp.ones((batch_size,), bool), rep), lib.data[2]


def bench_model(cfg: BenchConfig, name: str, dtype: str, peak: float) -> list[dict]:
    """Train and eval rows of one (model, dtype), PyTorch windows interleaved when asked.

    The train row times `jit_train_block` at one step per call: the exact step `resnet-jax
    train` runs (batch gather and augmentation, weight decay, the non-finite guard included).
    """
    remat = _remat(cfg, name)
    lib = library_step(cfg, name, dtype, scan_blocks=cfg.scan_blocks, remat=remat)
    n_dev = lib.mesh.size
    eval_args = _eval_batch(lib, cfg.batch_size)
    train = _Compiled(lib.train_block(1), lib.state, lib.data)
    evals = _Compiled(lib.eval_step, lib.state, *eval_args)
    xla_lowered = {}
    if lib.backend == "onednn":  # for FLOPs only: the same steps lowered (not compiled) by XLA
        xs = library_step(cfg, name, dtype, scan_blocks=cfg.scan_blocks, remat=remat,
                          backend="xla_cpu")
        xla_lowered["train"] = xs.train_block(1).lower(xs.state, xs.data)
        xla_lowered["eval"] = xs.eval_step.lower(xs.state, *eval_args)
    twins = []
    # bf16 twins (autocast) only on GPU: on CPU PyTorch's bf16 autocast is no fair baseline.
    if cfg.vs_torch and (dtype == "float32" or torch_device() == "cuda"):
        twins.append(("torch", TorchTwin(name, cfg.batch_size, device=torch_device(),
                                         dtype=dtype)))
        if torch_device() == "cuda":  # torch.compile beside eager, where it is the fast path
            twins.append(("torch_compile", TorchTwin(name, cfg.batch_size, device="cuda",
                                                     dtype=dtype, compile=True)))

    carry = [lib.state]

    def train_once():
        carry[0], metrics = train.fn(carry[0], lib.data)
        return metrics["loss"]

    def eval_once():
        return evals.fn(carry[0], *eval_args)["loss_sum"]

    rows = []
    for kind, run, steps in (("train", train_once, cfg.train_steps),
                             ("eval", eval_once, cfg.eval_steps)):
        measure.time_window(run, cfg.warmup)
        for _, twin in twins:
            twin.window(kind, cfg.warmup)
        ours, theirs = [], {label: [] for label, _ in twins}
        # Alternate windows so that load from other processes hits every framework alike.
        for _ in range(cfg.windows):
            ours.append(measure.time_window(run, steps))
            for label, twin in twins:
                theirs[label].append(twin.window(kind, steps))
        compiled = train if kind == "train" else evals
        row = {"model": name, "dtype": dtype, "step": kind, "batch_size": cfg.batch_size,
               "devices": n_dev, "scan_blocks": cfg.scan_blocks, "remat": remat,
               "backend": lib.backend, "streamed": lib.streamed,
               "image_size": lib.config.data.get("image_size"),
               **measure.summarize(ours, cfg.batch_size),
               **_analysis(compiled, n_dev, xla_lowered.get(kind)),
               "step_s_windows": ours, "precision": measure.jax_precision()}
        if row["flops_per_step"]:
            row["achieved_flops"] = row["flops_per_step"] / row["step_s_median"]
            row["fraction_of_matmul_peak"] = row["achieved_flops"] / peak
        row.update(measure.fraction_of_device_peak(row, dtype))
        for label, times in theirs.items():
            t = measure.summarize(times, cfg.batch_size)
            ratios = [b / a for a, b in zip(ours, times, strict=True)]  # ours/theirs throughput
            twin = dict(twins)[label]
            row[label] = {**t, "step_s_windows": times, "precision": twin.precision}
            row[f"ratio_vs_{label}"] = float(np.median(ratios))
            row[f"ratio_vs_{label}_min"], row[f"ratio_vs_{label}_max"] = min(ratios), max(ratios)
        row["peak_host_memory_bytes"] = measure.peak_host_memory_bytes()
        row["device_peak_memory_bytes"] = measure.device_peak_memory_bytes()
        rows.append(row)
    for _, twin in twins:
        twin.close()
    return rows


def bench_loop(cfg: BenchConfig, name: str, dtype: str, num_train: int = 45_000) -> dict:
    """The library's train step as `resnet-jax train` runs it on a GPU/TPU: `cfg.steps_per_call`
    steps per host call (`lax.scan`) on a synthetic resident 45k-image split, the state donated.
    Also projects the wall time of the paper's 64k iterations (train steps only: evaluation and
    checkpoints excluded).
    """
    lib = library_step(cfg, name, dtype, scan_blocks=cfg.scan_blocks, remat=_remat(cfg, name),
                       num_train=num_train)
    k = cfg.steps_per_call
    block = _Compiled(lib.train_block(k), lib.state, lib.data)
    carry = [lib.state]

    def call():
        carry[0], metrics = block.fn(carry[0], lib.data)
        return metrics["loss"]

    measure.time_window(call, 1)
    times = [measure.time_window(call, cfg.loop_calls) / k for _ in range(cfg.windows)]
    row = {"model": name, "dtype": dtype, "step": "loop", "batch_size": cfg.batch_size,
           "devices": lib.mesh.size, "steps_per_call": k, "scan_blocks": cfg.scan_blocks,
           "remat": lib.config.model.remat, **measure.summarize(times, cfg.batch_size),
           "trace_and_compile_s": block.total_s, "step_s_windows": times,
           "paper_steps": lib.config.train.num_steps}
    row["projected_paper_run_s"] = row["step_s_median"] * row["paper_steps"]
    row["device_peak_memory_bytes"] = measure.device_peak_memory_bytes()
    return row


def bench_compile_only(cfg: BenchConfig, name: str) -> dict:
    """Compile time (and static memory) of a deep model's float32 train step; optionally one run."""
    remat = _remat(cfg, name)
    t = time.perf_counter()
    lib = library_step(cfg, name, "float32", scan_blocks=True, remat=remat, num_train=256)
    init_s = time.perf_counter() - t
    train = _Compiled(lib.train_block(1), lib.state, lib.data)
    row = {"model": name, "dtype": "float32", "step": "train", "batch_size": cfg.batch_size,
           "devices": lib.mesh.size, "scan_blocks": True, "remat": remat, "init_s": init_s,
           **_analysis(train, lib.mesh.size)}
    if cfg.run_compile_only:
        state, metrics = train.fn(lib.state, lib.data)
        jax.block_until_ready(metrics)  # Proves the step fits in memory at this batch size.
        t = time.perf_counter()
        jax.block_until_ready(train.fn(state, lib.data))
        row["one_step_s"] = time.perf_counter() - t
    row["peak_host_memory_bytes"] = measure.peak_host_memory_bytes()
    return row


def bench_data(cfg: BenchConfig, mesh, num_images: int = 10_000) -> dict:
    """images/s of the on-device input pipeline alone (gather, normalise, crop, flip).

    `cfg.data_steps` batches are built inside one jitted call (`fori_loop`), each summed into a
    checksum so none is dropped: this times the device's work, as inside the train step, not the
    host's dispatch of one small call per batch (which bounds it on a GPU).
    """
    from resnet_jax.data import AugmentConfig, data_sharding, train_batch
    from resnet_jax.data.preprocess import NormStats

    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randint(0, 256, (num_images, 32, 32, 3), np.uint8))
    labels = jnp.asarray(rng.randint(0, 10, num_images), jnp.int32)
    stats = NormStats(np.full((32, 32, 3), 120.0, np.float32), np.full((3,), 64.0, np.float32))
    if mesh is not None:
        images, labels = jax.device_put((images, labels), NamedSharding(mesh, P()))
    out_sharding = data_sharding(mesh) if mesh is not None else None
    aug = AugmentConfig()
    key = jax.random.key(0)

    @jax.jit
    def data_block(start):
        def body(i, checksum):
            x, y = train_batch(images, labels, stats, key, start + i, batch_size=cfg.batch_size,
                               aug=aug, out_sharding=out_sharding)
            return checksum + jnp.sum(x) + jnp.sum(y)

        return jax.lax.fori_loop(0, cfg.data_steps, body, jnp.float32(0))

    counter = [0]

    def run():
        counter[0] += cfg.data_steps
        return data_block(jnp.int32(counter[0]))

    measure.time_window(run, 1)
    times = [measure.time_window(run, 1) / cfg.data_steps for _ in range(cfg.windows)]
    return {"batch_size": cfg.batch_size, "batches_per_call": cfg.data_steps,
            **measure.summarize(times, cfg.batch_size)}


def run(cfg: BenchConfig) -> dict:
    """Runs everything in `cfg` and returns the report (also what `--json` writes)."""
    mesh = make_mesh()
    if cfg.batch_size % mesh.size:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide by {mesh.size} devices")
    peaks = [measure.matmul_peak_flops()]
    rows = []
    for name in cfg.models:
        for dtype in cfg.dtypes:
            print(f"[bench] {name} {dtype} ...", file=sys.stderr, flush=True)
            rows.extend(bench_model(cfg, name, dtype, max(peaks)))
    loop_rows = []
    if cfg.steps_per_call is None:
        cfg = dataclasses.replace(
            cfg, steps_per_call=0 if jax.default_backend() == "cpu" else AUTO_STEPS_PER_CALL)
    if cfg.steps_per_call > 0:
        # The loop rows project the paper's CIFAR run from a resident split; an ImageNet model's
        # step takes streamed batches, which its train row above already times.
        for name in (m for m in cfg.models if not streams(m)):
            for dtype in cfg.dtypes:
                print(f"[bench] loop {name} {dtype} ...", file=sys.stderr, flush=True)
                loop_rows.append(bench_loop(cfg, name, dtype))
    peaks.append(measure.matmul_peak_flops())
    print("[bench] data pipeline ...", file=sys.stderr, flush=True)
    data = bench_data(cfg, mesh)
    compile_rows = []
    # The reference for "flat in depth": the shallowest net compiled the same (scanned) way.
    compile_models = list(cfg.compile_only_models)
    if compile_models and "resnet20" not in compile_models:
        compile_models.insert(0, "resnet20")
    for name in compile_models:
        print(f"[bench] compile {name} ...", file=sys.stderr, flush=True)
        compile_rows.append(bench_compile_only(cfg, name))
    best_train = max((r["images_per_s"] for r in rows if r["step"] == "train"), default=None)
    data["ratio_vs_best_train"] = data["images_per_s"] / best_train if best_train else None
    input_rows = None
    if cfg.input_pipeline:
        input_rows = bench_stream_input(cfg, rows)
    import os

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "matmul_peak_flops": max(peaks),
        "matmul_peak_flops_samples": peaks,
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "compile_only": compile_rows,
        "loop": loop_rows,
        "data_pipeline": data,
        "input_pipeline": input_rows,
    }


def bench_stream_input(cfg: BenchConfig, rows: list[dict]) -> dict:
    """The streaming pipeline's img/s on `cfg.image_size` px JPEG training batches (a generated
    folder unless `cfg.input_dir`), and the CPU cores each ImageNet-family train row needs."""
    from resnet_jax.bench import input_pipeline as inp

    print("[bench] input pipeline ...", file=sys.stderr, flush=True)
    with inp.input_folder(cfg.input_dir, cfg.input_images) as (folder, generated):
        report = inp.bench_input(folder, batch_size=cfg.batch_size, image_size=cfg.image_size,
                                 threads=cfg.input_threads, windows=cfg.windows,
                                 batches_per_thread=cfg.input_batches_per_thread)
    report["generated"] = generated
    report["feeding"] = inp.feeding(rows, report["images_per_s_per_core"])
    return report
