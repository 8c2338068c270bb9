"""Thin launcher for the depth ablation: `python scripts/ablate_depth.py [ablate args...]`.

Same as `resnet-jax ablate ...`; e.g.
  python scripts/ablate_depth.py --config mini --workdir runs/mini --depths 8,20,32 --seeds 0
"""

import sys

from resnet_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
