"""oneDNN backend: oneDNN's direct CPU convolutions as XLA custom calls, behind `LayerFactory`.

`conv` runs oneDNN's convolution kernels (`conv.py`, through the ctypes FFI handler in
`ffi_ctypes.py`); everything else is the XLA:CPU backend's (`resnet_jax.backends.xla_cpu`).
"""

from resnet_jax.backends.onednn.conv import BLOCK, available, unavailable_reason
from resnet_jax.backends.onednn.layers import OneDNNConv, OneDNNLayers

__all__ = ["BLOCK", "OneDNNConv", "OneDNNLayers", "available", "unavailable_reason"]
