"""XLA settings that make the CPU backend fast for these models; applied before jax starts.

XLA reads `XLA_FLAGS` once, when jax initialises its first backend, so `configure_cpu` must run
before any jax computation (the CLI entry points call it before importing the library's jax code).
It only appends flags the user has not set, never touches a backend already running, and the
flags it sets are read only by XLA's CPU (host) backend, so on a GPU/TPU host they change
nothing on the accelerator. See docs/performance.md for the measurements behind each flag.
"""

from __future__ import annotations

import os
import sys
import warnings

# Route convolutions away from YNNPACK's per-convolution fusion: its weight-gradient convolutions
# ran near 11 GFLOP/s and left cores idle here (docs/performance.md, "attempts").
CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Host devices to simulate when the caller does not say: splitting a CIFAR batch over several
# host devices runs the per-device convolutions concurrently and keeps every core busy.
DEFAULT_NUM_DEVICES = 8
ENV_NUM_DEVICES = "RESNET_JAX_CPU_DEVICES"


def backend_initialized() -> bool:
    """True when jax has already created a backend (then XLA_FLAGS can no longer take effect)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # Only inspected; importing jax does not start a backend.

    return xla_bridge.backends_are_initialized()


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].strip()


def cpu_flags(num_devices: int | None = None) -> list[str]:
    """The flags `configure_cpu` would append: the convolution routing and the host device count.

    `num_devices`: host devices to simulate; None reads $RESNET_JAX_CPU_DEVICES, else
    DEFAULT_NUM_DEVICES; 1 (or 0) adds no device-count flag.
    """
    if num_devices is None:
        num_devices = int(os.environ.get(ENV_NUM_DEVICES, DEFAULT_NUM_DEVICES))
    flags = [CONV_FLAG]
    if num_devices > 1:
        flags.append(f"{DEVICE_COUNT_FLAG}={num_devices}")
    return flags


def configure_cpu(num_devices: int | None = None) -> list[str]:
    """Appends the fast-CPU XLA flags to `XLA_FLAGS`; returns the flags it added.

    Adds nothing when jax's backend is already initialised (warns), when `JAX_PLATFORMS` excludes
    the CPU, or for a flag whose name the user has already put in `XLA_FLAGS` (the user's choice
    wins, flag by flag). Safe to call more than once.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return []
    if backend_initialized():
        warnings.warn("configure_cpu: jax's backend is already initialised; XLA_FLAGS unchanged.",
                      stacklevel=2)
        return []
    current = os.environ.get("XLA_FLAGS", "")
    present = {_flag_name(f) for f in current.split()}
    added = [f for f in cpu_flags(num_devices) if _flag_name(f) not in present]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
