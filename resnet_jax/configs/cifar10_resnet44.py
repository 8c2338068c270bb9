"""ResNet-44 on CIFAR-10 with the paper's recipe (Table 6 row)."""

from resnet_jax.configs._paper import paper_config


def get_config():
    """The preset's config."""
    return paper_config("cifar_resnet", 44)
