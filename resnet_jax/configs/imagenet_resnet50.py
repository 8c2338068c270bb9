"""ResNet-50 v1.5 on ImageNet: batch 256, lr 0.1 x batch/256, 5 warm-up epochs, cosine decay.

Run it on a class-folder copy of ImageNet (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) with
--config.data.source=folder --config.data.data_dir=DIR, or on TFDS's prepared imagenet2012.
"""

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
    # Streamed (docs/data.md): random-resized 224 crops for training, 256 -> 224 centre crops
    # for evaluation, the usual fixed ImageNet mean and std.
    config.data.pipeline = "stream"
    config.data.image_size = 224
    config.data.normalization = "imagenet"
    config.optim.schedule = "cosine"
    config.optim.warmup = "linear"
    config.optim.warmup_steps = 5 * STEPS_PER_EPOCH
    config.optim.scale_with_batch = True
    config.optim.reference_batch_size = 256
    config.optim.decay_bn_and_bias = False
    config.train.batch_size = 256
    config.train.eval_batch_size = 512  # divides over 8, 16, ... devices
    config.train.num_steps = 90 * STEPS_PER_EPOCH
    config.train.eval_every = 5 * STEPS_PER_EPOCH
    config.train.checkpoint_every = STEPS_PER_EPOCH
    config.train.eval_splits = ("test",)
    return config
