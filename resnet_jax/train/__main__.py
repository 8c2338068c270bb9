"""`python -m resnet_jax.train --config quick --workdir runs/quick`: same as `resnet-jax train`."""

import sys

from resnet_jax.backends.xla_flags import reexec_with_malloc_tuning
from resnet_jax.cli import main

if __name__ == "__main__":
    reexec_with_malloc_tuning()
    sys.exit(main(["train", *sys.argv[1:]]))
