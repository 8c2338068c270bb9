"""The recipe of He et al. 2015 sec. 4.2, shared by the cifar10_* presets."""

import ml_collections

from resnet_jax.config import default_config


def paper_config(family: str, depth: int) -> ml_collections.ConfigDict:
    """CIFAR-10, 45k/5k split, SGD 0.9, wd 1e-4, batch 128, lr 0.1 /10 at 32k and 48k, 64k steps."""
    config = default_config()
    config.model.family = family
    config.model.depth = depth
    config.data.name = "cifar10"
    if depth >= 110:
        # "we use 0.01 to warm up the training until the training error is below 80% (about 400
        # iterations), and then go back to 0.1" (sec. 4.2); a fixed 400 steps here.
        config.optim.warmup = "constant"
        config.optim.warmup_steps = 400
        config.optim.warmup_learning_rate = 0.01
    return config
