"""The benchmark proper: compile, time (interleaved with the PyTorch twin), analyse, report.

Import this only after `resnet_jax.platform.configure_cpu` has run (it imports jax).
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.bench import measure
from resnet_jax.bench.step import build_state, make_eval_step, make_mesh, make_train_step
from resnet_jax.config import AUTO_STEPS_PER_CALL
from resnet_jax.models import parse_name

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
    conv_impl: str = "auto"  # the models' convolutions: "auto", "xla" or "onednn"


def torch_device() -> str:
    """Where the PyTorch twin runs: on the GPU when JAX runs on one, else on the CPU."""
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def _depth(name: str) -> int:
    return parse_name(name)[1]


def _remat(cfg: BenchConfig, name: str) -> bool:
    return cfg.remat == "on" or (cfg.remat == "auto" and _depth(name) > 110)


def _batch(mesh, batch_size: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(batch_size, 32, 32, 3), jnp.float32)
    y = jnp.asarray(rng.randint(0, 10, batch_size), jnp.int32)
    if mesh is not None:
        x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    return x, y


class TorchTwin:
    """The PyTorch twin (benchmarks/torch_resnet.py, not part of the library) in a child process.

    `window(kind, steps)` runs `steps` train or eval steps there and returns seconds per step.
    A separate process, driven in lockstep, keeps the two frameworks' thread pools apart: in one
    process torch's spin-waiting OpenMP threads slowed XLA's step by ~30% (and XLA's slowed
    torch), which measured the co-hosting, not either framework. The child inherits this
    process's environment (GLIBC_TUNABLES included), so both run under the same settings.
    """

    def __init__(self, name: str, batch_size: int, *, device: str = "cpu",
                 dtype: str = "float32"):
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_resnet.py"
        if not path.exists():
            raise FileNotFoundError(f"--vs-torch needs {path} (run from a source checkout)")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, str(path), "--serve", str(_depth(name)), str(batch_size), device,
             dtype],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        if self._proc.stdout.readline().strip() != "ready":
            self._fail("could not start")

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
        "xla_memory_per_device": measure.memory_analysis(compiled.fn),
    }


def bench_model(cfg: BenchConfig, name: str, dtype: str, mesh, peak: float) -> list[dict]:
    """Train and eval rows of one (model, dtype), PyTorch windows interleaved when asked."""
    n_dev = 1 if mesh is None else mesh.size
    remat = _remat(cfg, name)
    state = build_state(name, dtype=DTYPES[dtype], scan_blocks=cfg.scan_blocks, remat=remat,
                        mesh=mesh, conv_impl=cfg.conv_impl)
    x, y = _batch(mesh, cfg.batch_size)
    train = _Compiled(make_train_step(state, mesh=mesh), state.params, state.batch_stats,
                      state.opt_state, x, y)
    evals = _Compiled(make_eval_step(state, mesh=mesh), state.params, state.batch_stats, x, y)
    xla_lowered = {}
    if state.uses_onednn:  # for FLOPs only: the same steps lowered (not compiled) with XLA's
        xs = build_state(name, dtype=DTYPES[dtype], scan_blocks=cfg.scan_blocks, remat=remat,
                         mesh=mesh, conv_impl="xla")
        xla_lowered["train"] = make_train_step(xs, mesh=mesh).lower(
            xs.params, xs.batch_stats, xs.opt_state, x, y)
        xla_lowered["eval"] = make_eval_step(xs, mesh=mesh).lower(xs.params, xs.batch_stats, x, y)
    torch = None
    # bf16 twin (autocast) only on GPU: on CPU PyTorch's bf16 autocast is no fair baseline.
    if cfg.vs_torch and (dtype == "float32" or torch_device() == "cuda"):
        torch = TorchTwin(name, cfg.batch_size, device=torch_device(), dtype=dtype)

    carry = [state.params, state.batch_stats, state.opt_state]

    def train_once():
        p, s, o, loss = train.fn(*carry, x, y)
        carry[:] = [p, s, o]
        return loss

    def eval_once():
        return evals.fn(carry[0], carry[1], x, y)

    rows = []
    for kind, run, steps in (("train", train_once, cfg.train_steps),
                             ("eval", eval_once, cfg.eval_steps)):
        measure.time_window(run, cfg.warmup)
        if torch:
            torch.window(kind, cfg.warmup)
        ours, theirs = [], []
        # Alternate windows so that load from other processes hits both frameworks alike.
        for _ in range(cfg.windows):
            ours.append(measure.time_window(run, steps))
            if torch:
                theirs.append(torch.window(kind, steps))
        compiled = train if kind == "train" else evals
        row = {"model": name, "dtype": dtype, "step": kind, "batch_size": cfg.batch_size,
               "devices": n_dev, "scan_blocks": cfg.scan_blocks, "remat": remat,
               "conv_impl": "onednn" if state.uses_onednn else "xla",
               **measure.summarize(ours, cfg.batch_size),
               **_analysis(compiled, n_dev, xla_lowered.get(kind)),
               "step_s_windows": ours}
        if row["flops_per_step"]:
            row["achieved_flops"] = row["flops_per_step"] / row["step_s_median"]
            row["fraction_of_matmul_peak"] = row["achieved_flops"] / peak
        if theirs:
            t = measure.summarize(theirs, cfg.batch_size)
            ratios = [b / a for a, b in zip(ours, theirs, strict=True)]  # ours/torch throughput
            row["torch"] = {**t, "step_s_windows": theirs}
            row["ratio_vs_torch"] = float(np.median(ratios))
            row["ratio_vs_torch_min"], row["ratio_vs_torch_max"] = min(ratios), max(ratios)
        row["peak_host_memory_bytes"] = measure.peak_host_memory_bytes()
        row["device_peak_memory_bytes"] = measure.device_peak_memory_bytes()
        rows.append(row)
    if torch:
        torch.close()
    return rows


def bench_loop(cfg: BenchConfig, name: str, dtype: str, num_train: int = 45_000) -> dict:
    """The library's train step as `resnet-jax train` runs it, on a synthetic resident dataset.

    The paper preset for `name` (SGD, schedule, wd 1e-4, crop+flip on the device), the uint8
    training split replicated on every device, `cfg.steps_per_call` steps per host call
    (`lax.scan`), the state donated. Also projects the wall time of the paper's 64k iterations
    (train steps only: evaluation and checkpoints excluded).
    """
    from resnet_jax.configs._paper import paper_config
    from resnet_jax.data import DataSpec, replicate
    from resnet_jax.data.preprocess import NormStats
    from resnet_jax.train.loop import jit_train_block
    from resnet_jax.train.loop import make_mesh as train_mesh
    from resnet_jax.train.optim import make_optimizer, make_schedule
    from resnet_jax.train.state import create_state, graphdefs

    family, depth = parse_name(name)[:2]
    config = paper_config(family, depth)
    config.model.dtype = dtype
    config.model.scan_blocks = cfg.scan_blocks
    config.model.conv_impl = cfg.conv_impl
    config.model.remat = _remat(cfg, name)
    config.train.batch_size = cfg.batch_size
    t = config.train
    mesh = train_mesh()
    spec = DataSpec("synthetic", "random", 10, (32, 32, 3), tuple(map(str, range(10))),
                    num_train, 0, 0)
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (num_train, 32, 32, 3), np.uint8)
    labels = rng.randint(0, 10, num_train).astype(np.int32)
    stats = NormStats(np.full((32, 32, 3), 120.0, np.float32), np.full((3,), 64.0, np.float32))
    data = replicate((images, labels, stats), mesh)
    schedule = make_schedule(config.optim, t.batch_size, t.num_steps)
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    train_def, _ = graphdefs(config, spec)
    state = create_state(config, spec, tx, NamedSharding(mesh, P()))
    k = cfg.steps_per_call
    block = _Compiled(jit_train_block(config, train_def, tx, schedule, mesh, k), state, data)
    carry = [state]

    def call():
        carry[0], metrics = block.fn(carry[0], data)
        return metrics["loss"]

    measure.time_window(call, 1)
    times = [measure.time_window(call, cfg.loop_calls) / k for _ in range(cfg.windows)]
    row = {"model": name, "dtype": dtype, "step": "loop", "batch_size": cfg.batch_size,
           "devices": mesh.size, "steps_per_call": k, "scan_blocks": cfg.scan_blocks,
           "remat": config.model.remat, **measure.summarize(times, cfg.batch_size),
           "trace_and_compile_s": block.total_s, "step_s_windows": times,
           "paper_steps": t.num_steps}
    row["projected_paper_run_s"] = row["step_s_median"] * t.num_steps
    row["device_peak_memory_bytes"] = measure.device_peak_memory_bytes()
    return row


def bench_compile_only(cfg: BenchConfig, name: str, mesh) -> dict:
    """Compile time (and static memory) of a deep model's float32 train step; optionally one run."""
    n_dev = 1 if mesh is None else mesh.size
    remat = _remat(cfg, name)
    t = time.perf_counter()
    state = build_state(name, scan_blocks=True, remat=remat, mesh=mesh, conv_impl=cfg.conv_impl)
    init_s = time.perf_counter() - t
    x, y = _batch(mesh, cfg.batch_size)
    train = _Compiled(make_train_step(state, mesh=mesh), state.params, state.batch_stats,
                      state.opt_state, x, y)
    row = {"model": name, "dtype": "float32", "step": "train", "batch_size": cfg.batch_size,
           "devices": n_dev, "scan_blocks": True, "remat": remat, "init_s": init_s,
           **_analysis(train, n_dev)}
    if cfg.run_compile_only:
        out = train.fn(state.params, state.batch_stats, state.opt_state, x, y)
        jax.block_until_ready(out)  # Proves the step fits in memory at this batch size.
        t = time.perf_counter()
        jax.block_until_ready(train.fn(*out[:3], x, y))
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
    if mesh is not None and cfg.batch_size % mesh.size:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide by {mesh.size} devices")
    peaks = [measure.matmul_peak_flops()]
    rows = []
    for name in cfg.models:
        for dtype in cfg.dtypes:
            print(f"[bench] {name} {dtype} ...", file=sys.stderr, flush=True)
            rows.extend(bench_model(cfg, name, dtype, mesh, max(peaks)))
    loop_rows = []
    if cfg.steps_per_call is None:
        cfg = dataclasses.replace(
            cfg, steps_per_call=0 if jax.default_backend() == "cpu" else AUTO_STEPS_PER_CALL)
    if cfg.steps_per_call > 0:
        for name in cfg.models:
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
        compile_rows.append(bench_compile_only(cfg, name, mesh))
    best_train = max((r["images_per_s"] for r in rows if r["step"] == "train"), default=None)
    data["ratio_vs_best_train"] = data["images_per_s"] / best_train if best_train else None
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
    }
