"""The depth ablation in miniature: shows the degradation problem on 2 CPU cores in ~20 minutes.

Run as a grid, which sets `model.family`, `model.depth` and `train.seed` per run:
    resnet-jax ablate --config mini --workdir runs/mini --depths 8,20,32 --seeds 0
It uses the bundled Fashion-MNIST sample (4.5k train / 500 validation / 1k test, no download)
without augmentation, so training error measures optimisation alone, which is what degradation is
about: after 150 steps the deepest plain net fits the training set worse than the shallow one,
while the residual nets do not get worse with depth.

Cost: a step costs about the number of 3x3 layers (depth - 2). Depths 8, 20, 32 x plain/residual
at 150 steps of 32 images took 24 minutes on this project's 2-core machine while it was shared
(load average 8-13); on idle cores it is several times faster (not measured). The measured table
and figures are in docs/ablation.md and docs/mini/.
"""

from resnet_jax.config import default_config


def get_config():
    """The preset's config."""
    config = default_config()
    config.model.family = "cifar_resnet"
    config.model.depth = 20
    config.data.name = "fashion_mnist_sample"
    config.data.validation_size = 500
    # No augmentation: the question is how well each net optimises, not how well it generalises.
    config.data.pad = 0
    config.data.crop = False
    config.data.flip = False
    config.optim.learning_rate = 0.1
    config.optim.schedule = "cosine"
    # A short warmup keeps the deepest plain net from diverging at lr 0.1 in its first steps.
    config.optim.warmup = "linear"
    config.optim.warmup_steps = 10
    config.train.batch_size = 32
    config.train.num_steps = 150
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.eval_batch_size = 250
    config.train.eval_splits = ("test",)
    config.train.checkpoint_every = 25
    config.train.keep_checkpoints = 7  # every checkpoint, for the gradient-norm plot
    return config
