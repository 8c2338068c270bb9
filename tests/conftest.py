"""Test setup: simulate 8 CPU devices before jax is imported anywhere."""

import os
import signal
import subprocess
import sys
import tempfile
import threading

# The same fast-CPU convolution routing as the CLI applies (resnet_jax/backends/xla_flags.py).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile each distinct step once per test session, also across the subprocesses tests start:
# most of the suite's time is XLA compiling the same small ResNet-8 steps.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="resnet_jax_test_jit_cache_")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests never touch the network: make TFDS fail fast instead of retrying downloads.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-dir-for-tests")

import pytest  # noqa: E402


def tiny_config(**train_overrides):
    """ResNet-8 on the bundled Fashion-MNIST sample: the shared small setting of the test suite."""
    from resnet_jax.config import get_preset

    config = get_preset("quick")
    config.train.batch_size = 64
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.train.eval_batch_size = 200
    config.train.async_checkpoints = False
    config.optim.warmup_steps = 0
    for k, v in train_overrides.items():
        config.train[k] = v
    return config


def cli_process_env(devices: int) -> dict[str, str]:
    """The environment of a `resnet-jax` subprocess on `devices` CPU devices, with this checkout
    first on the path; the CLI adds its own CPU flags, as for a user."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# tiny_config(batch_size=32) for `resnet-jax train --config quick`, logging every step, with no
# evaluation or checkpoint before step 1000.
PREEMPTED_RUN = ["--config.train.batch_size=32", "--config.optim.warmup_steps=0",
                 "--config.train.num_steps=100000", "--config.train.log_every=1",
                 "--config.train.eval_every=1000", "--config.train.checkpoint_every=1000"]


@pytest.fixture(scope="session")
def sample_dataset():
    """The bundled sample, loaded once for the whole session."""
    from resnet_jax.data import load_dataset

    return load_dataset(tiny_config().data)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, sample_dataset):
    """A finished 20-step ResNet-8 run (batch 64, checkpoints at 10 and 20), shared by tests.

    It runs 5 steps per host call (`lax.scan`), so the block-of-steps path is what they check.
    """
    from resnet_jax.train import train_and_evaluate

    workdir = tmp_path_factory.mktemp("tiny_run")
    result = train_and_evaluate(tiny_config(steps_per_call=5), workdir, dataset=sample_dataset,
                                interactive=False)
    return workdir, result


@pytest.fixture(scope="session")
def preempted_run(tmp_path_factory):
    """`resnet-jax train` as a user starts it on one CPU device (the CLI's default path), sent
    SIGTERM once step 2 is logged: (workdir, exit status, stdout, stderr).

    Its 100,000 steps cannot finish first, so the signal always lands inside the training loop.
    """
    workdir = tmp_path_factory.mktemp("preempted") / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_jax.cli", "train", "--workdir", str(workdir), "--config",
         "quick", *PREEMPTED_RUN], env=cli_process_env(1), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    errors: list[str] = []
    logged_step_2 = threading.Event()

    def read_stdout():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                logged_step_2.set()

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)]
    for r in readers:
        r.start()
    try:
        for _ in range(600):
            if logged_step_2.wait(1) or proc.poll() is not None:
                break
        if not logged_step_2.is_set():
            pytest.fail("resnet-jax train did not log step 2:\n" + "".join(lines + errors)[-3000:])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for r in readers:
        r.join(timeout=10)
    return workdir, proc.returncode, "".join(lines), "".join(errors)
