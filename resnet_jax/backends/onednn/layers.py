"""The oneDNN layer factory: XLA:CPU's layers with oneDNN's convolutions."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax
from flax import nnx

from resnet_jax.backends.onednn import conv
from resnet_jax.backends.xla_cpu import XlaCpuLayers

_NOTICED: set[str] = set()


def _notice(reason: str) -> None:
    """Says once per process and reason that XLA runs a convolution oneDNN cannot."""
    if reason not in _NOTICED:
        _NOTICED.add(reason)
        print(f"oneDNN backend: XLA runs convolutions with {reason}.", file=sys.stderr)


class OneDNNConv(nnx.Conv):
    """`nnx.Conv` (same parameters, NHWC in and out) run by oneDNN's direct kernels.

    A convolution oneDNN cannot run (another dtype, channel counts off its block, dilation,
    groups, 'SAME' padding...) is `nnx.Conv` unchanged, with one line on stderr saying why.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        why = self._unsupported(inputs)
        if why is not None:
            _notice(why)
            return super().__call__(inputs)
        (pt, pb), (pl, pr) = self.padding
        return conv.conv2d_nhwc(inputs.astype(self.dtype or inputs.dtype), self.kernel[...],
                                int(self.strides[0]), (pt, pb, pl, pr))

    def _unsupported(self, inputs: jax.Array) -> str | None:
        strides = self.strides if isinstance(self.strides, Sequence) else (self.strides,) * 2
        if isinstance(self.padding, str) or len(set(strides)) != 1:
            return f"padding={self.padding!r}, strides={strides} (explicit pads, equal strides)"
        if (self.feature_group_count != 1 or self.use_bias or self.mask is not None
                or any(d != 1 for d in _pair(self.input_dilation))
                or any(d != 1 for d in _pair(self.kernel_dilation))):
            return "groups, bias, masks or dilation"
        return conv.unsupported(inputs.shape, self.kernel.shape, self.dtype or inputs.dtype)


def _pair(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (v if v is not None else 1,) * 2


@dataclasses.dataclass(frozen=True)
class OneDNNLayers(XlaCpuLayers):
    """`XlaCpuLayers` whose convolutions are `OneDNNConv` (CPU, one device)."""

    conv_cls = OneDNNConv
