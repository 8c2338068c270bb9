"""Experiment configs: the default config, presets by name, command-line overrides, validation.

A config is an `ml_collections.ConfigDict` with four sections (`model`, `data`, `optim`, `train`).
Presets live in `resnet_jax/configs/<name>.py`, each with a `get_config()`; any value can be
overridden with `--config.section.key=value`, and an unknown key is an error that names the close
matches.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import math
import pkgutil
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from resnet_jax.data import default_data_config, validate_data_config
from resnet_jax.models import FAMILIES
from resnet_jax.models.blocks import SHORTCUTS
from resnet_jax.rundir.files import read_json

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("piecewise", "cosine", "constant")
WARMUPS = ("none", "constant", "linear")
DTYPES = ("float32", "bfloat16", "float16")
# The most steps `train.steps_per_call=0` (auto) runs per host call on GPU/TPU. On an H200 it took
# ResNet-110's step from 19.4 ms (one step per call) to 13.3 ms (docs/performance.md).
AUTO_STEPS_PER_CALL = 100


class ConfigError(ValueError):
    """A config value or override is invalid; the message names the key and what is valid."""


def default_config() -> ml_collections.ConfigDict:
    """He et al. 2015's CIFAR-10 recipe for ResNet-20 (every preset starts from this)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {
            "family": "cifar_resnet",
            "depth": 20,
            "shortcut": "",  # "" = the family's default (A for CIFAR residual, none for plain)
            "dtype": "float32",  # compute dtype; parameters and optimiser state stay float32
            "zero_init_last_bn": False,
            "bn_momentum": 0.9,
            "bn_epsilon": 1e-5,
            "bn_group_size": 0,  # 0: BN statistics over the global batch; 64: the paper's per-GPU
            "scan_blocks": False,  # one scanned block per stage: compile time flat in depth
            "remat": False,
            # The layers' implementation (resnet_jax/backends): "auto", "plain" (stock Flax),
            # "xla_cpu" or "onednn" (CPU speed-ups). Same values and checkpoints either way.
            "backend": "auto",
        }
    )
    c.data = default_data_config()
    c.optim = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "b1": 0.9,
            "b2": 0.999,
            "weight_decay": 1e-4,  # L2 on all weights, as the paper
            "decay_bn_and_bias": True,  # False: decay only conv/dense kernels
            "grad_clip_norm": 0.0,  # 0 = off
            "schedule": "piecewise",
            "boundaries": (32000, 48000),  # paper: /10 at 32k and 48k iterations
            "decay_factor": 0.1,
            "warmup": "none",  # constant: ResNet-110's 0.01 for the first warmup_steps
            "warmup_steps": 0,
            "warmup_learning_rate": 0.01,
            "scale_with_batch": False,  # linear scaling: lr * batch_size / reference_batch_size
            "reference_batch_size": 128,
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "batch_size": 128,
            "num_steps": 64000,
            "seed": 0,
            "log_every": 100,
            "eval_every": 2000,
            "eval_batch_size": 500,
            "eval_splits": ("validation", "test"),
            "checkpoint_every": 2000,
            "keep_checkpoints": 3,
            # Steps per host call (lax.scan over a block of steps). 0 = auto: 1 on CPU; on
            # GPU/TPU up to AUTO_STEPS_PER_CALL, dividing the log/eval/checkpoint intervals.
            "steps_per_call": 0,
            "loss_scale": 0.0,  # >0: initial dynamic loss scale (float16 on GPU)
            "max_consecutive_nonfinite": 10,
            "async_checkpoints": True,
            # A model file (`resnet-jax export` or `convert`) whose weights a fresh run starts
            # from; "" = random init. See resnet_jax/train/pretrained.py.
            "init_from": "",
        }
    )
    return c


def available_presets() -> list[str]:
    """Names of the preset files under resnet_jax/configs/."""
    import resnet_jax.configs as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def preset_obstacle(name: str) -> str | None:
    """Why preset `name` cannot run as it is (its validation error), or None."""
    try:
        validate(get_preset(name))
    except ConfigError as e:
        return str(e)
    return None


def get_preset(name: str) -> ml_collections.ConfigDict:
    """The config of preset `name` (a file under resnet_jax/configs/, or a path to a .py file)."""
    if name.endswith(".py"):
        return _user_config(name)
    presets = available_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"Unknown config preset {name!r}.{hint} Available: {', '.join(presets)}.")
    return importlib.import_module(f"resnet_jax.configs.{name}").get_config()


def _user_config(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the user's config file `path`; ConfigError naming it on any failure."""
    spec = importlib.util.spec_from_file_location("_user_config", path)
    if spec is None or not Path(path).is_file():
        raise ConfigError(f"--config {path!r}: no such file.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        raise ConfigError(f"--config {path}: importing it raised {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--config {path} has no get_config() function; a config file "
                          "defines `def get_config() -> ml_collections.ConfigDict`.")
    try:
        config = get_config()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--config {path}: get_config() raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config {path}: get_config() returned a {type(config).__name__}, "
                          "not an ml_collections.ConfigDict (start from "
                          "resnet_jax.config.default_config()).")
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _all_keys(v, prefix + k + ".")
    return keys


def _parse_value(text: str, current):
    """Parses an override's text into the type of the value it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        return int(float(text)) if float(text).is_integer() else int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):  # bare words: test,validation
            value = tuple(w.strip() for w in text.strip("()[]").split(",") if w.strip())
        return tuple(value) if isinstance(value, tuple | list) else (value,)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]):
    """Applies `section.key=value` overrides (the `--config.` prefix is optional) in place."""
    keys = _all_keys(config)
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like --config.section.key=value.")
        key, text = item.split("=", 1)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown config key {key!r}.{hint}")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"{key!r} is a section; override one of its keys, e.g. {key}.x=...")
        try:
            value = _parse_value(text, current)
        except (ValueError, SyntaxError) as e:
            kind = type(current).__name__
            raise ConfigError(f"config.{key}={text!r} is not a valid {kind} ({e}).") from None
        with node.ignore_type():
            node[leaf] = value
    return config


def load_config(preset: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A preset with command-line overrides applied, validated."""
    config = apply_overrides(get_preset(preset), overrides)
    validate(config)
    return config


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """A run's saved config.json laid over today's `default_config()`.

    Keys added to the config after the run was made (e.g. `model.bn_group_size`) take their
    defaults, so old runs still restore and resume. Raises ConfigError if there is no config.json.
    """
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{Path(workdir).absolute()} is not a run directory: it has no "
                          "config.json.")

    def merge(base: ml_collections.ConfigDict, saved: dict) -> None:
        for k, v in saved.items():
            if k in base and isinstance(base[k], ml_collections.ConfigDict) and isinstance(v, dict):
                merge(base[k], v)
            else:
                with base.ignore_type():
                    base[k] = tuple(v) if isinstance(v, list) else v

    try:
        saved = read_json(path, "run config")
    except (ValueError, OSError) as e:
        raise ConfigError(f"{e} Restore it from a copy; without it the run's model and data are "
                          "unknown.") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a run config (a JSON object); restore it from a copy.")
    model = saved.get("model", {})
    if "conv_impl" in model:  # runs made before `model.backend` replaced `model.conv_impl`
        legacy = model.pop("conv_impl")
        model.setdefault("backend", {"xla": "xla_cpu"}.get(legacy, legacy))
    config = default_config()
    merge(config, saved)
    return config


def _check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is not valid: {valid}.")


# The largest float32: training computes in float32 (or less), where a larger value is inf.
FLOAT32_MAX = 3.4028234663852886e38


def _positive(config, key: str, *, allow_zero: bool = False) -> None:
    section, leaf = key.split(".")
    v = config[section][leaf]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 0 if allow_zero else v > 0)
    _check(ok, key, v, "must be a finite number " + (">= 0" if allow_zero else "> 0"))
    _check(v <= FLOAT32_MAX, key, v, f"must be at most {FLOAT32_MAX:.4g} (the largest float32; "
           "training computes in float32, where a larger value is infinite)")


def resolve_steps_per_call(train: ml_collections.ConfigDict, backend: str) -> int:
    """`train.steps_per_call`, with 0 (auto) resolved for a jax backend ("cpu", "gpu", "tpu").

    Auto is 1 on CPU, where a step takes far longer than its dispatch; elsewhere the largest
    number of steps up to AUTO_STEPS_PER_CALL that divides log_every, eval_every and
    checkpoint_every, so logs, evaluations and checkpoints still fall on block boundaries.
    Call it on a validated config (positive integer intervals).
    """
    if train.steps_per_call:
        return train.steps_per_call
    if backend == "cpu":
        return 1
    g = math.gcd(train.log_every, train.eval_every, train.checkpoint_every)
    return max(d for d in range(1, min(g, AUTO_STEPS_PER_CALL) + 1) if g % d == 0)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks every value before anything compiles; a ConfigError names the key and valid range."""
    m, o, t = config.model, config.optim, config.train
    _check(m.family in FAMILIES, "model.family", m.family, f"choose one of {FAMILIES}")
    _check(m.shortcut in ("", *SHORTCUTS), "model.shortcut", m.shortcut,
           f"choose one of {('', *SHORTCUTS)} ('' = the family's default)")
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"choose one of {DTYPES}")
    from resnet_jax.backends import BACKENDS

    _check(m.backend in BACKENDS, "model.backend", m.backend, f"choose one of {BACKENDS}")
    g = m.bn_group_size
    _check(isinstance(g, int) and g >= 0 and (g == 0 or config.train.batch_size % g == 0),
           "model.bn_group_size", g,
           f"must be 0 (global BN) or divide train.batch_size={config.train.batch_size}")
    from resnet_jax.models.registry import (
        CIFAR_FAMILIES,
        IMAGENET_STAGE_SIZES,
        cifar_blocks_per_stage,
    )

    if m.family in CIFAR_FAMILIES:
        try:
            cifar_blocks_per_stage(m.family, m.depth)
        except ValueError as e:
            raise ConfigError(f"config.model.depth: {e}") from None
    else:
        _check(m.depth in IMAGENET_STAGE_SIZES, "model.depth", m.depth,
               f"choose one of {sorted(IMAGENET_STAGE_SIZES)} for {m.family}")
    _check(0 <= m.bn_momentum < 1, "model.bn_momentum", m.bn_momentum, "must be in [0, 1)")
    _positive(config, "model.bn_epsilon")
    from resnet_jax.data import DATASET_NAMES

    if config.data.name not in DATASET_NAMES:
        close = difflib.get_close_matches(str(config.data.name), DATASET_NAMES, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        _check(False, "data.name", config.data.name,
               f"choose one of {tuple(sorted(DATASET_NAMES))}{hint}")
    try:
        validate_data_config(config.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(o.name in OPTIMIZERS, "optim.name", o.name, f"choose one of {OPTIMIZERS}")
    _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"choose one of {SCHEDULES}")
    _check(o.warmup in WARMUPS, "optim.warmup", o.warmup, f"choose one of {WARMUPS}")
    _positive(config, "optim.learning_rate")
    for key in ("optim.weight_decay", "optim.grad_clip_norm", "optim.warmup_steps",
                "optim.warmup_learning_rate", "train.loss_scale"):
        _positive(config, key, allow_zero=True)
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    for key in ("b1", "b2"):
        _check(0 <= o[key] < 1, f"optim.{key}", o[key], "must be in [0, 1)")
    _check(isinstance(o.reference_batch_size, int) and o.reference_batch_size > 0,
           "optim.reference_batch_size", o.reference_batch_size, "must be an integer > 0")
    _check(isinstance(t.seed, int) and not isinstance(t.seed, bool) and t.seed >= 0,
           "train.seed", t.seed, "must be an integer >= 0")
    _check(0 < o.decay_factor <= 1, "optim.decay_factor", o.decay_factor, "must be in (0, 1]")
    _check(all(isinstance(b, int) and b > 0 for b in o.boundaries)
           and list(o.boundaries) == sorted(o.boundaries),
           "optim.boundaries", o.boundaries, "must be increasing positive step numbers")
    for key in ("train.batch_size", "train.num_steps", "train.log_every", "train.eval_every",
                "train.eval_batch_size", "train.checkpoint_every", "train.keep_checkpoints",
                "train.max_consecutive_nonfinite"):
        section, leaf = key.split(".")
        v = config[section][leaf]
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, v,
               "must be an integer > 0")
    k = t.steps_per_call
    _check(isinstance(k, int) and not isinstance(k, bool) and k >= 0, "train.steps_per_call", k,
           "must be an integer >= 0 (0 = auto)")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        _check(k == 0 or t[key] % k == 0, f"train.{key}", t[key],
               f"must be a multiple of train.steps_per_call={k}")
    _check(isinstance(t.get("init_from", ""), str), "train.init_from", t.get("init_from"),
           "must be a path to a model file, or '' for none")
    bad_splits = [s for s in t.eval_splits if s not in ("validation", "test")]
    _check(not bad_splits, "train.eval_splits", t.eval_splits,
           "choose from ('validation', 'test')")
    if m.dtype == "float16" and t.loss_scale == 0:
        raise ConfigError("config.model.dtype='float16' needs dynamic loss scaling: "
                          "set config.train.loss_scale to e.g. 32768.")
    if num_devices is not None:
        for key in ("batch_size", "eval_batch_size"):
            _check(t[key] % num_devices == 0, f"train.{key}", t[key],
                   f"must be divisible by the number of devices ({num_devices}); on CPU the "
                   "CLI simulates $RESNET_JAX_CPU_DEVICES devices (default 1)")
