"""Backend speed-ups, reaching the models through one seam: the `LayerFactory` a network is built
with (`resnet_jax.models.layers`). A backend is a factory subclass returning faster modules with
the same parameters and the same NHWC contract, so checkpoints never depend on it and a block
that builds its own modules still runs under every backend.

  plain    stock Flax NNX layers: what `resnet_jax.models` uses on its own; best on GPU/TPU,
           where XLA picks cuDNN's or the TPU's kernels itself.
  xla_cpu  XLA's convolutions with an explicit-layout backward pass, a closed-form BatchNorm
           backward pass and fusion barriers (`xla_cpu.py`): XLA:CPU's fast path.
  onednn   xla_cpu with oneDNN's direct convolution kernels (`onednn/`), on one CPU device.
  auto     plain on GPU/TPU; on CPU whichever of xla_cpu / onednn is faster on this processor
           (`select`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.models.layers import LayerFactory

BACKENDS = ("auto", "plain", "xla_cpu", "onednn")


def check_backend(name: str) -> str:
    """Returns `name` if it is one of BACKENDS, else raises a ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not valid; choose one of {BACKENDS}.")
    return name


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.split(":", 1)[0].strip() == field and ":" in line), "")
    except OSError:
        return ""


@functools.cache
def cpu_isa() -> str:
    """The widest x86 vector extension of this CPU: "avx512", "avx2" or "other"."""
    flags = _cpuinfo("flags").split()
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def cpu_model() -> str:
    """The host processor's name with its widest vector extension, e.g. "AMD EPYC (avx512)",
    which a CPU result's speed depends on; platform.processor() without /proc/cpuinfo."""
    import platform  # here: select() below has an argument of that name

    return f"{_cpuinfo('model name') or platform.processor() or 'unknown'} ({cpu_isa()})"


# Which CPU path trains faster, by ISA (docs/performance.md, ResNet-20/56 f32 batch 128, the two
# measured side by side in one run). Unmeasured processors keep XLA's convolutions.
FASTER_ON_CPU = {"avx2": "onednn", "avx512": "onednn"}


def select(name: str, *, dtype: Any = jnp.float32, num_devices: int | None = None,
           platform: str | None = None) -> tuple[str, str]:
    """Resolves a backend name for this run: (backend, why), `why` saying why auto chose it.

    An explicit name is kept; "onednn" where it cannot run at all (not installed or not
    loadable, or not on the CPU) raises a ValueError saying why. On several devices an explicit
    "onednn" still gives the right values, but XLA gathers the batch onto every device.
    """
    check_backend(name)
    platform = platform or jax.default_backend()
    num_devices = jax.device_count() if num_devices is None else num_devices
    if name == "onednn" and (why := _onednn_unusable(platform)):
        raise ValueError(f"backend='onednn' cannot run here: {why}; use 'auto' or 'xla_cpu'.")
    if name != "auto":
        return name, "chosen"
    if platform != "cpu":
        return "plain", f"{platform}: XLA picks the device's kernels"
    preferred = FASTER_ON_CPU.get(cpu_isa(), "xla_cpu")
    if preferred == "onednn" and (obstacle := _onednn_obstacle(dtype, num_devices, platform)):
        return "xla_cpu", f"not oneDNN: {obstacle}"
    return preferred, f"the faster CPU path on {cpu_isa()} processors"


def _onednn_unusable(platform: str) -> str | None:
    from resnet_jax.backends import onednn

    if platform != "cpu":
        return f"the {platform} backend (oneDNN runs on the CPU)"
    if not onednn.available():
        return onednn.unavailable_reason()
    return None


def _onednn_obstacle(dtype: Any, num_devices: int, platform: str) -> str | None:
    """Why auto should not pick oneDNN for this run (None: nothing against it)."""
    if num_devices != 1:
        # A custom call has no SPMD partitioning rule: XLA would gather the batch onto every device.
        return f"{num_devices} devices (a custom call cannot be partitioned over a mesh)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"dtype {jnp.dtype(dtype).name} (float32 only)"
    return _onednn_unusable(platform)


def layer_factory(name: str) -> type[LayerFactory]:
    """The factory class of a resolved backend name (not "auto": `select` first)."""
    if name == "plain":
        return LayerFactory
    if name == "xla_cpu":
        from resnet_jax.backends.xla_cpu import XlaCpuLayers

        return XlaCpuLayers
    if name == "onednn":
        from resnet_jax.backends.onednn import OneDNNLayers

        return OneDNNLayers
    raise ValueError(f"backend={name!r} is not a resolved backend; choose one of "
                     f"{BACKENDS[1:]} (select() resolves 'auto').")
