"""What a grid's runs were: the lines stated above Table 6 (data, schedule, model, dtype,
hardware, seeds, wall time), read from each run's config.json, versions.json and metrics.jsonl.

A value shared by every net is one line; where nets differ (the 110-layer nets' warm-up) each
value names its nets, so a table mixing schedules cannot pass for one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from resnet_jax.ablation.grid import net_name


class Run(Protocol):
    """The parts of a report's run (`report.RunResult`) that the setup reads."""

    workdir: Path
    kind: str
    depth: int
    seed: int
    config: dict
    versions: dict
    wall_time_s: float | None
    wall_time_estimated: bool


def _number(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)  # e.g. "?" for a field an older config lacks
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def data_text(cfg: dict, versions: dict) -> str:
    """The dataset, where it was read from, the held-out split, normalisation, augmentation."""
    d = cfg.get("data", {})
    text = str(d.get("name", "?"))
    source = d.get("source")
    if source == "folder" and d.get("data_dir"):
        text += f" from the class folders in `{Path(str(d['data_dir'])).name}`"
    elif source:
        text += f" (source {source})"
    if d.get("validation_size"):
        text += (f"; {_number(d['validation_size'])} training images held out for validation"
                 f" (split seed {d.get('split_seed', 0)})")
    if d.get("normalization"):
        text += f"; normalisation {d['normalization']}"
    aug = [f"pad {d['pad']} + random crop" if d.get("crop") and d.get("pad") else
           "random crop" if d.get("crop") else "", "flip" if d.get("flip") else ""]
    if d.get("image_size"):
        aug = [f"random-resized crop to {d['image_size']}", "flip" if d.get("flip") else ""]
    aug = [a for a in aug if a]
    text += f"; augmentation: {', '.join(aug) if aug else 'none'}"
    if versions.get("pipeline"):
        text += f"; {versions['pipeline']} input pipeline"
    return text


def schedule_text(cfg: dict, versions: dict) -> str:
    """Steps, batch, optimiser, learning-rate schedule and warm-up."""
    o, t = cfg.get("optim", {}), cfg.get("train", {})
    parts = [f"{_number(t.get('num_steps', '?'))} steps of batch {t.get('batch_size', '?')}"]
    name = o.get("name", "sgd")
    if name == "sgd":
        opt = f"SGD momentum {o.get('momentum', '?')}" + (" (Nesterov)" if o.get("nesterov")
                                                           else "")
    else:
        opt = str(name)
    parts.append(f"{opt}, weight decay {_number(o.get('weight_decay', 0))}")
    lr = f"learning rate {_number(o.get('learning_rate', '?'))}"
    if o.get("schedule") == "piecewise" and o.get("boundaries"):
        lr += (f", x{_number(o.get('decay_factor', 0.1))} at steps "
               + " and ".join(_number(b) for b in o["boundaries"]))
        if min(o["boundaries"]) >= t.get("num_steps", 0):
            lr += " (after the last step: it never decays)"
    elif o.get("schedule"):
        lr += f", {o['schedule']} schedule"
    parts.append(lr)
    if o.get("warmup", "none") != "none" and o.get("warmup_steps"):
        parts.append(f"warm-up: {_number(o['warmup_steps'])} steps " + (
            f"at {_number(o.get('warmup_learning_rate'))}" if o["warmup"] == "constant"
            else f"{o['warmup']} from 0"))
    else:
        parts.append("no warm-up")
    return "; ".join(parts)


def model_text(cfg: dict, versions: dict) -> str:
    """The family and its shortcut option."""
    from resnet_jax.models.registry import CIFAR_FAMILIES

    m = cfg.get("model", {})
    family = m.get("family", "?")
    shortcut = m.get("shortcut") or CIFAR_FAMILIES.get(family, (None, None, "?"))[2]
    return f"{family}, " + ("no shortcuts" if shortcut == "none"
                            else f"option {shortcut} shortcuts")


def compute_text(cfg: dict, versions: dict) -> str:
    """The compute dtype and the backend that ran the convolutions."""
    text = str(cfg.get("model", {}).get("dtype", "?"))
    if versions.get("backend"):
        text += f", backend {versions['backend']}"
    return text


def hardware_text(cfg: dict, versions: dict) -> str:
    """The devices a run trained on (with the host CPU for CPU runs) and the jax version."""
    devices = versions.get("devices") or []
    kind = versions.get("device_kind") or (devices[0].split(":")[0] if devices else "unknown")
    text = f"{len(devices) or '?'} x {kind}"
    if kind == "cpu" and versions.get("host_cpu"):
        text += f" ({versions['host_cpu']})"
    if versions.get("process_count", 1) > 1:
        text += f" over {versions['process_count']} processes"
    if versions.get("jax"):
        text += f"; jax {versions['jax']}"
    return text


def packing_text(cfg: dict, versions: dict) -> str:
    """Whether the run shared one compiled program with other seeds."""
    packed = versions.get("packed_with")
    return (f"packed with {len(packed)} other run(s) in one program" if packed
            else "one run per program")


ASPECTS: tuple[tuple[str, Callable[[dict, dict], str]], ...] = (
    ("Data", data_text), ("Schedule", schedule_text), ("Model", model_text),
    ("Compute", compute_text), ("Hardware", hardware_text), ("Seeds", packing_text))


def _grouped(values: dict[str, list[str]]) -> str:
    """'value' if one value, else 'value (net, net); value (net)'."""
    if len(values) == 1:
        return next(iter(values))
    return "; ".join(f"{v} ({', '.join(nets)})" for v, nets in values.items())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def setup_lines(runs: Sequence[Run]) -> list[str]:
    """Markdown bullet lines saying how the runs were trained, for above the table."""
    nets: dict[tuple[str, int], list[Run]] = {}
    for r in runs:
        nets.setdefault((r.kind, r.depth), []).append(r)
    lines = []
    for title, describe in ASPECTS:
        values: dict[str, list[str]] = {}
        for (kind, depth), group in nets.items():
            for text in dict.fromkeys(describe(r.config, r.versions) for r in group):
                values.setdefault(text, []).append(net_name(kind, depth))
        if title == "Seeds":
            seeds = sorted({r.seed for r in runs})
            counts = sorted({len(g) for g in nets.values()})
            per_net = "/".join(str(c) for c in counts)
            lines.append(f"- Seeds: {', '.join(map(str, seeds))} ({per_net} per net); "
                         + _grouped(values))
        else:
            lines.append(f"- {title}: {_grouped(values)}")
    lines.append(wall_time_line(runs, nets))
    return lines


def wall_time_line(runs: Sequence[Run], nets: dict[tuple[str, int], list[Run]]) -> str:
    """Mean wall time per run of each net, and the total, counting each packed program once."""
    per_net = []
    for (kind, depth), group in nets.items():
        times = [r.wall_time_s for r in group if r.wall_time_s is not None]
        if times:
            per_net.append(f"{net_name(kind, depth)} {_minutes(sum(times) / len(times))}")
    programs: dict[frozenset, float] = {}
    for r in runs:
        if r.wall_time_s is None:
            continue
        members = frozenset([r.workdir.name, *r.versions.get("packed_with", [])])
        programs[members] = max(programs.get(members, 0.0), r.wall_time_s)
    if not per_net:
        return "- Wall time: not recorded"
    estimated = any(r.wall_time_estimated for r in runs)
    return (f"- Wall time{' (estimated from the logged throughput)' if estimated else ''}, "
            f"per run (training and its evaluations): {', '.join(per_net)}; "
            f"{_minutes(sum(programs.values()))} in all (packed seeds counted once)")
