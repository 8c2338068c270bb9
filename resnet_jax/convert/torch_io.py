"""Reading and writing PyTorch state_dict files (torch is an optional dependency).

Both of torch's file formats are read: the zip format of `torch.save` since PyTorch 1.6 and the
legacy pickle format before it (akamaster's checkpoints). Loading uses `weights_only=True`, so a
file can hold tensors and plain containers but no code; a file that needs more is refused.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

INSTALL_HINT = "pip install 'resnet-jax[torch]'"
# Wrappers a training script may put around the state_dict in a checkpoint.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def import_torch() -> ModuleType:
    """The torch module, or a ModuleNotFoundError that says how to install it."""
    try:
        import torch
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"converting PyTorch weights needs torch: {INSTALL_HINT}", name="torch") from None
    return torch


def _unwrap(obj: object, path: Path) -> dict:
    """The state_dict inside a checkpoint: the object itself or one of its usual wrappers."""
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(hasattr(v, "shape") for v in obj.values()):
            return obj
    keys = list(obj)[:8] if isinstance(obj, dict) else []
    raise ValueError(f"{path} holds no state_dict: expected a dict of tensors or a dict with one "
                     f"of {_STATE_DICT_KEYS}; found {type(obj).__name__} with keys {keys}.")


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # nn.DataParallel and torch.compile prefix every key; the layout is the same without it.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch checkpoint's state_dict as float32/int64 numpy arrays, without wrapper prefixes.

    Raises FileNotFoundError for a missing file and ValueError naming the file for one torch
    cannot read safely (corrupt, not a torch file, or pickled code that `weights_only` refuses).
    """
    torch = import_torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{path} is not a PyTorch checkpoint that can be read safely "
                         f"(torch.load with weights_only=True failed: {reason}).") from None
    state = _unwrap(obj, path)
    out = {}
    for key, value in state.items():
        if not hasattr(value, "detach"):
            raise ValueError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, "
                             "not a tensor.")
        out[str(key)] = value.detach().cpu().numpy()
    return _strip_prefix(out)


def write_state_dict(state: dict[str, np.ndarray], path: str | Path) -> Path:
    """Saves `state` as torch tensors with `torch.save` (zip format), atomically."""
    torch = import_torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()}  # copies
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensors, tmp)
    tmp.replace(path)  # a crash never leaves a half-written file under the real name
    return path
