"""One layer of a network in both naming schemes, and the tensor moves between them.

A torch layout is described as a list of `Layer`s: which of our modules (e.g.
`stages/1/first/conv1`) corresponds to which torch module (`layer2.0.conv1`), what kind it is,
and optional channel permutations. From that list follow the expected key set, the conversion
to our flat tensor names (`params/...`, `batch_stats/...`) and back.

Tensor layouts: torch convolutions are OIHW, ours HWIO; torch linear weights are [out, in],
ours [in, out]. BatchNorm: torch weight/bias/running_mean/running_var are our
scale/bias/mean/var (the same eval-mode formula with the same epsilon).
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("conv", "bn", "linear")
# A BatchNorm buffer that only matters for momentum=None; read if present, written on export.
BN_COUNTER = "num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One module in both schemes.

    `out_perm[k]` is the torch channel that becomes our output channel k (conv outputs, BN
    channels); `in_perm` likewise for input channels (conv and linear). None: identity.
    """

    ours: str
    torch: str
    kind: str
    out_perm: tuple[int, ...] | None = None
    in_perm: tuple[int, ...] | None = None

    def torch_keys(self) -> tuple[str, ...]:
        """The torch state_dict keys this layer needs (without BN's batch counter)."""
        names = {"conv": ("weight",), "linear": ("weight", "bias"),
                 "bn": ("weight", "bias", "running_mean", "running_var")}[self.kind]
        return tuple(f"{self.torch}.{n}" for n in names)


def our_names(layers: list[Layer]) -> set[str]:
    """Our flat tensor names that `layers` fill (what `to_ours` returns)."""
    leaves = {"conv": ("params/{}/kernel",), "linear": ("params/{}/kernel", "params/{}/bias"),
              "bn": ("params/{}/scale", "params/{}/bias", "batch_stats/{}/mean",
                     "batch_stats/{}/var")}
    return {f.format(layer.ours) for layer in layers for f in leaves[layer.kind]}


def _take(x: np.ndarray, perm: tuple[int, ...] | None, axis: int) -> np.ndarray:
    return x if perm is None else np.take(x, np.asarray(perm), axis=axis)


def _untake(x: np.ndarray, perm: tuple[int, ...] | None, axis: int) -> np.ndarray:
    return x if perm is None else np.take(x, np.argsort(np.asarray(perm)), axis=axis)


def check_keys(found: set[str], layers: list[Layer], what: str) -> None:
    """Raises ValueError naming the missing and unexpected keys if `found` is not `layers`'."""
    expected = {k for layer in layers for k in layer.torch_keys()}
    optional = {f"{layer.torch}.{BN_COUNTER}" for layer in layers if layer.kind == "bn"}
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - optional)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            return f"{keys[:8]}{more}" if keys else "none"

        raise ValueError(f"the state_dict does not match {what}: missing keys {show(missing)}; "
                         f"unexpected keys {show(unexpected)}.")


# A BatchNorm's tensors: (our name, torch's name, our collection).
BN_TENSORS = (("scale", "weight", "params"), ("bias", "bias", "params"),
              ("mean", "running_mean", "batch_stats"), ("var", "running_var", "batch_stats"))


def to_ours(state: dict[str, np.ndarray], layers: list[Layer]) -> dict[str, np.ndarray]:
    """Our flat tensors (`params/<module>/kernel`, `batch_stats/<module>/mean`, ...), float32."""
    out = {}
    for layer in layers:
        t, o = layer.torch, layer.ours
        if layer.kind == "conv":
            w = _take(_take(state[f"{t}.weight"], layer.out_perm, 0), layer.in_perm, 1)
            out[f"params/{o}/kernel"] = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif layer.kind == "linear":
            w = _take(state[f"{t}.weight"], layer.in_perm, 1)
            out[f"params/{o}/kernel"] = w.T
            out[f"params/{o}/bias"] = state[f"{t}.bias"]
        else:
            for ours, theirs, group in BN_TENSORS:
                out[f"{group}/{o}/{ours}"] = _take(state[f"{t}.{theirs}"], layer.out_perm, 0)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def to_torch(tensors: dict[str, np.ndarray], layers: list[Layer],
             batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """The inverse of `to_ours`: a torch state_dict (numpy), with BN's `num_batches_tracked`."""
    out = {}
    for layer in layers:
        t, o = layer.torch, layer.ours
        if layer.kind == "conv":
            w = tensors[f"params/{o}/kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
            out[f"{t}.weight"] = _untake(_untake(w, layer.out_perm, 0), layer.in_perm, 1)
        elif layer.kind == "linear":
            out[f"{t}.weight"] = _untake(tensors[f"params/{o}/kernel"].T, layer.in_perm, 1)
            out[f"{t}.bias"] = tensors[f"params/{o}/bias"]
        else:
            for ours, theirs, group in BN_TENSORS:
                out[f"{t}.{theirs}"] = _untake(tensors[f"{group}/{o}/{ours}"], layer.out_perm, 0)
            out[f"{t}.{BN_COUNTER}"] = np.asarray(batches_tracked, np.int64)
    return {k: np.ascontiguousarray(v) if v.dtype == np.int64 else
            np.ascontiguousarray(v, np.float32) for k, v in out.items()}
