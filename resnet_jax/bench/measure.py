"""Measurement helpers: windowed timing, XLA cost/memory analysis, matmul peak, host memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def time_window(run: Callable[[], Any], steps: int) -> float:
    """Seconds per call of `run` over one window of `steps` calls (blocks on the last result)."""
    t = time.perf_counter()
    out = None
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


def summarize(step_times: list[float], batch_size: int) -> dict[str, float]:
    """Median step time, its spread (min, max over windows) and images/s at the median."""
    med = statistics.median(step_times)
    return {
        "step_s_median": med,
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "images_per_s": batch_size / med,
        "windows": len(step_times),
    }


def _cost(compiled: Any, key: str) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # Some backends do not implement it.
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost:
        return None
    value = cost.get(key)
    return float(value) if value is not None and value > 0 else None


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of one call from XLA's cost analysis of a lowered or compiled computation (None if
    unknown). With several devices a compiled analysis describes one device's SPMD program, so
    callers multiply by the device count."""
    return _cost(compiled, "flops")


def cost_bytes(compiled: Any) -> float | None:
    """Bytes read and written by one call, from XLA's cost analysis (None if unknown)."""
    return _cost(compiled, "bytes accessed")


# Dense peaks of the accelerators we quote (vendor data sheets): FLOP/s by the precision the
# step's convolutions run in, and memory bytes/s. Float32 convolutions at JAX's default precision
# run on TF32 tensor cores on these GPUs.
DEVICE_PEAKS = {
    "H200": {"float32": 494.7e12, "bfloat16": 989.4e12, "bytes": 4.8e12},
    "H100": {"float32": 494.7e12, "bfloat16": 989.4e12, "bytes": 3.35e12},
    "A100": {"float32": 156e12, "bfloat16": 312e12, "bytes": 2.0e12},
}


def device_peaks() -> dict[str, float] | None:
    """The first device's peaks from DEVICE_PEAKS, by its name (None for CPUs and others)."""
    kind = jax.devices()[0].device_kind
    return next((p for name, p in DEVICE_PEAKS.items() if name in kind), None)


def fraction_of_device_peak(row: dict, dtype: str) -> dict[str, float]:
    """`row`'s achieved FLOP/s and bytes/s as fractions of the device's peaks (GPU only)."""
    peaks = device_peaks()
    if not peaks:
        return {}
    out = {}
    per_device_s = row["step_s_median"] * max(row.get("devices", 1), 1)  # the step's work / device
    if row.get("flops_per_step"):
        out["fraction_of_device_flops"] = row["flops_per_step"] / per_device_s / peaks[dtype]
    if row.get("bytes_per_step"):
        out["fraction_of_device_bytes"] = row["bytes_per_step"] / per_device_s / peaks["bytes"]
    return out


def jax_precision() -> str:
    """What float32 convolutions and matmuls compute in on this backend (for the report)."""
    setting = jax.config.jax_default_matmul_precision
    if jax.default_backend() == "gpu":
        if setting in (None, "default", "bfloat16", "tensorfloat32"):
            return f"TF32 (jax_default_matmul_precision={setting})"
        return f"full float32 (jax_default_matmul_precision={setting})"
    return f"float32 ({jax.default_backend()})"


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """XLA's static buffer sizes of one executable, per device: arguments, outputs, temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k, 0)) for k in keys}


def peak_host_memory_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def device_peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first device, where the backend reports it (GPU/TPU; not CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def matmul_peak_flops(n: int = 2048, windows: int = 3, steps: int = 3) -> float:
    """Best float32 FLOP/s of an n x n matmul on the default device: the roofline we compare to."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    best = min(time_window(lambda: f(a, b), steps) for _ in range(windows))
    return 2.0 * n**3 / best
