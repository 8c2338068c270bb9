"""Test setup: simulate 8 CPU devices before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network: make TFDS fail fast instead of retrying downloads.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-dir-for-tests")
