"""XLA settings that make the CPU backend fast for these models; applied before jax starts.

XLA reads `XLA_FLAGS` once, when jax initialises its first backend, so `configure_cpu` must run
before any jax computation (the CLI entry points call it before importing the library's jax code).
It only appends flags the user has not set, never touches a backend already running, and the
flags it sets are read only by XLA's CPU (host) backend, so on a GPU/TPU host they change
nothing on the accelerator. See docs/performance.md for the measurements behind each flag.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings

# Route convolutions away from YNNPACK's per-convolution fusion: its weight-gradient convolutions
# ran near 11 GFLOP/s and left cores idle here (docs/performance.md, "attempts").
CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Host devices to simulate when the caller does not say. One: XLA then runs each convolution on
# both cores' Eigen threads and splits the other fusions two ways, which since `canonical_conv2d`
# really runs beats splitting the batch over 2 simulated devices by 1.25x (ResNet-20) and 1.17x
# (ResNet-56), paired, separate processes (docs/performance.md). Before that fix and
# `materialize`, 8 devices had hidden XLA's idle time (~2.6x over one).
DEFAULT_NUM_DEVICES = 1
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


# glibc's malloc backs large blocks with transparent huge pages (2 MiB) when asked to. XLA:CPU
# allocates its step buffers afresh on every call; with 4 KiB pages that cost ~83k page faults
# (~20% of CPU time in the kernel) and TLB misses per ResNet-20 step (docs/performance.md).
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
ENV_NO_REEXEC = "RESNET_JAX_NO_MALLOC_TUNING"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available() -> bool:
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def malloc_tuning_applies() -> bool:
    """True when `reexec_with_malloc_tuning` would restart: Linux with glibc and huge pages
    available, the tunable not yet set, and $RESNET_JAX_NO_MALLOC_TUNING unset."""
    if sys.platform != "linux" or os.environ.get(ENV_NO_REEXEC):
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return platform.libc_ver()[0] == "glibc" and _thp_available()


def reexec_with_malloc_tuning() -> None:
    """Restarts this program once, unchanged, with glibc's huge-page malloc switched on.

    glibc reads GLIBC_TUNABLES only when a process starts, so a program that wants it must be
    started with it: the `resnet-jax` console script and `scripts/bench.py` call this first thing
    (before jax is imported). The process keeps its PID, arguments and open files. Nothing
    happens when `malloc_tuning_applies()` is False (other OS or libc, huge pages disabled, the
    user's own GLIBC_TUNABLES already naming the tunable, or $RESNET_JAX_NO_MALLOC_TUNING set).
    """
    if not malloc_tuning_applies():
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES", ""), MALLOC_TUNABLE) if t)
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
