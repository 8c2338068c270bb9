"""ResNet-50 v1.5 on ImageNet: batch 256, lr 0.1 x batch/256, 5 warm-up epochs, cosine decay."""

from resnet_jax.config import default_config

STEPS_PER_EPOCH = 1_281_167 // 256


def get_config():
    """The preset's config."""
    config = default_config()
    config.model.family = "imagenet_resnet"
    config.model.depth = 50
    config.model.dtype = "bfloat16"
    config.model.zero_init_last_bn = True
    config.data.name = "imagenet2012"
    config.data.validation_size = 0
    config.optim.schedule = "cosine"
    config.optim.warmup = "linear"
    config.optim.warmup_steps = 5 * STEPS_PER_EPOCH
    config.optim.scale_with_batch = True
    config.optim.reference_batch_size = 256
    config.optim.decay_bn_and_bias = False
    config.train.batch_size = 256
    config.train.num_steps = 90 * STEPS_PER_EPOCH
    config.train.eval_every = 5 * STEPS_PER_EPOCH
    config.train.checkpoint_every = STEPS_PER_EPOCH
    config.train.eval_splits = ("test",)
    return config
