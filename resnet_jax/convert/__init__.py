"""PyTorch ResNet state_dicts <-> our parameters and BatchNorm statistics.

`resnet-jax convert --from akamaster|torchvision FILE --out MODEL.safetensors` writes a torch
checkpoint in our export format (resnet_jax/inference/export.py); `--to torchvision` writes an
ImageNet-family run or model file as a torchvision state_dict. torch is imported only when a
file is read or written (`pip install 'resnet-jax[torch]'`).
"""

from resnet_jax.convert.files import (
    LAYOUTS,
    classifier_from_state_dict,
    convert_torch_file,
    export_torchvision,
    torchvision_state_dict,
)
from resnet_jax.convert.layout import Layout
from resnet_jax.convert.mapping import Layer, check_keys, to_ours, to_torch
from resnet_jax.convert.stacking import stack_like, unstack
from resnet_jax.convert.torch_io import read_state_dict, write_state_dict

__all__ = [
    "LAYOUTS",
    "Layer",
    "Layout",
    "check_keys",
    "classifier_from_state_dict",
    "convert_torch_file",
    "export_torchvision",
    "read_state_dict",
    "stack_like",
    "to_ours",
    "to_torch",
    "torchvision_state_dict",
    "unstack",
    "write_state_dict",
]
