"""Benchmarks: train/eval step timing, XLA cost and memory analysis, the PyTorch comparison.

`main(argv)` is the `resnet-jax bench` command (see `resnet_jax.bench.cli`).
"""

from resnet_jax.bench.cli import main

__all__ = ["main"]
