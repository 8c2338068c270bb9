"""Thin launcher for the benchmark: `python scripts/bench.py --models resnet20 --vs-torch`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_jax.backends.xla_flags import reexec_with_malloc_tuning  # noqa: E402
from resnet_jax.bench.cli import main  # noqa: E402  (configure_cpu runs inside main, pre-jax)

if __name__ == "__main__":
    reexec_with_malloc_tuning()  # restarts once with glibc's huge-page malloc (Linux)
    sys.exit(main())
