"""A ResNet-8 on the bundled Fashion-MNIST sample: about a minute on 2 CPU cores, no download."""

from resnet_jax.config import default_config


def get_config():
    """The preset's config."""
    config = default_config()
    config.model.depth = 8
    config.data.name = "fashion_mnist_sample"
    config.data.validation_size = 500
    config.data.flip = True
    config.optim.schedule = "cosine"
    config.optim.learning_rate = 0.1
    config.optim.warmup = "linear"
    config.optim.warmup_steps = 20
    config.train.batch_size = 64
    config.train.num_steps = 300
    config.train.log_every = 20
    config.train.eval_every = 100
    config.train.eval_batch_size = 200
    config.train.checkpoint_every = 100
    return config
