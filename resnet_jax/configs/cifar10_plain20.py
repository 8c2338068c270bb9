"""Plain-20 (ResNet-20 without shortcuts) on CIFAR-10 with the paper's recipe (Figure 6, left)."""

from resnet_jax.configs._paper import paper_config


def get_config():
    """The preset's config."""
    return paper_config("cifar_plain", 20)
