"""Test setup: simulate 8 CPU devices before jax is imported anywhere."""

import os
import tempfile

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
