"""Scanned stages (`model.scan_blocks=True`) store a stage's repeated blocks stacked.

An unscanned net names the blocks after a stage's first `stages/1/rest/0/conv1/kernel`,
`stages/1/rest/1/conv1/kernel`, ...; a scanned one holds them as one array
`stages/1/rest/conv1/kernel` with a leading block axis. Conversions work on the unscanned
names; these two functions move between the forms.
"""

from __future__ import annotations

import re

import numpy as np

# `<prefix>/rest/<module...>` where the segment after `rest` is a module name, not a block index.
_STACKED = re.compile(r"^(?P<head>.*/rest)/(?P<tail>[^/0-9][^/]*/.*)$")


def unstack(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat tensors with every stacked `rest/...` array split into `rest/<i>/...`."""
    out = {}
    for name, x in tensors.items():
        m = _STACKED.match(name)
        if m is None:
            out[name] = x
        else:
            for i in range(x.shape[0]):
                out[f"{m['head']}/{i}/{m['tail']}"] = x[i]
    return out


def stack_like(tensors: dict[str, np.ndarray], template: dict[str, tuple[int, ...]]
               ) -> dict[str, np.ndarray]:
    """`tensors` (unscanned names) in the names of `template` (name -> shape), stacking the
    blocks where the template is scanned. Names the template lacks are dropped; a stacked name
    whose blocks are not all present is left out (the caller reports it missing)."""
    out = {}
    for name, shape in template.items():
        m = _STACKED.match(name)
        if m is None:
            if name in tensors:
                out[name] = tensors[name]
            continue
        parts = [f"{m['head']}/{i}/{m['tail']}" for i in range(shape[0])]
        if all(p in tensors for p in parts):
            out[name] = np.stack([tensors[p] for p in parts])
    return out
