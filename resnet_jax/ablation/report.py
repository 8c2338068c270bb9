"""The grid's report, regenerated from the run directories at any time.

Writes, under `ROOT/report/` by default:
  table6.md, table6.csv  Table 6: per (kind, depth) the parameter count, our final test error as
                         mean +- std over seeds (sample std, ddof=1) and the best run, the paper's
                         figure beside it and the difference, and the final training error;
                         above the table, how the runs were trained (`setup.setup_lines`).
  figure6.png            error vs iterations, thin dashed train and bold test, per depth and kind.
  figure7.png            std of each 3x3 layer's response on the test set (final checkpoint).
  gradient_norms.png     per-layer gradient norms at each saved checkpoint.
Figures 6, 7 and the gradient norms show the lowest seed of each (kind, depth), as the paper shows
single runs. The analysis of a run is cached in its `analysis.json` (keyed by its checkpoints).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from resnet_jax.ablation import paper
from resnet_jax.ablation.grid import FAMILY_KIND, KINDS, kind_name, net_name
from resnet_jax.ablation.setup import setup_lines
from resnet_jax.rundir.files import atomic_write, atomic_write_text, read_json
from resnet_jax.rundir.metrics import metrics_by_split, wall_time

ANALYSIS_VERSION = 1
TAIL = 0.2  # the fraction of training that `train_error_tail` averages over
CSV_FIELDS = ("kind", "depth", "params", "seeds", "finished", "test_error_mean", "test_error_std",
              "test_error_best", "train_error_mean", "train_error_tail", "paper_error",
              "paper_params_m",
              "diff_mean", "diff_best", "dataset", "steps", "wall_time_s_mean")


@dataclasses.dataclass
class RunResult:
    """What the report needs from one run directory."""

    workdir: Path
    kind: str
    depth: int
    seed: int
    dataset: str
    num_steps: int
    last_step: int  # last step with a test evaluation (0 if none yet)
    test_error: float | None  # at last_step
    train_error: float | None  # the last logged training error (mean over the log interval)
    # Mean training error over the last TAIL of the steps: less noisy on short runs, where one
    # log interval holds only a few hundred images.
    train_error_tail: float | None
    curves: dict  # split -> (steps, errors)
    config: dict
    versions: dict = dataclasses.field(default_factory=dict)  # versions.json, {} if unreadable
    wall_time_s: float | None = None  # to the last train record (see metrics.wall_time)
    wall_time_estimated: bool = False

    @property
    def finished(self) -> bool:
        """Whether the run was evaluated at its final step."""
        return self.last_step >= self.num_steps


def collect_runs(root: str | Path, unreadable: list[str] | None = None) -> list[RunResult]:
    """Every plain/residual run directory directly under `root`, sorted by kind, depth, seed.

    A run whose config.json or metrics.jsonl cannot be read (e.g. cut short by a kill in an
    older version) is left out; why is appended to `unreadable` if given.
    """
    runs = []
    for d in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            continue
        try:
            cfg = read_json(cfg_path, "run config")
            kind = FAMILY_KIND.get(cfg["model"]["family"])
            m = metrics_by_split(d)
        except (ValueError, KeyError, TypeError, OSError) as e:
            if unreadable is not None:
                unreadable.append(f"{d}: {e}")
            continue
        if kind is None:
            continue
        curves = {s: ([k for k in sorted(v)], [v[k]["error"] for k in sorted(v)])
                  for s, v in m.items()}
        test, train = m.get("test", {}), m.get("train", {})
        last = max(test) if test else 0
        wall, estimated = wall_time([train[k] for k in sorted(train)],
                                        int(cfg["train"].get("batch_size", 0)))
        runs.append(RunResult(
            workdir=d, kind=kind, depth=int(cfg["model"]["depth"]),
            seed=int(cfg["train"]["seed"]), dataset=cfg["data"]["name"],
            num_steps=int(cfg["train"]["num_steps"]), last_step=last,
            test_error=test[last]["error"] if test else None,
            train_error=train[max(train)]["error"] if train else None,
            train_error_tail=float(np.mean([v["error"] for s, v in train.items()
                                            if s > (1 - TAIL) * int(cfg["train"]["num_steps"])]
                                           or [np.nan])) if train else None,
            curves=curves, config=cfg, versions=_read_versions(d), wall_time_s=wall,
            wall_time_estimated=estimated,
        ))
    order = list(KINDS)
    return sorted(runs, key=lambda r: (order.index(r.kind), r.depth, r.seed))


def _read_versions(run_dir: Path) -> dict:
    """A run's versions.json, or {} where it is missing or damaged (the report states less)."""
    try:
        versions = read_json(run_dir / "versions.json", "versions file")
    except (OSError, ValueError):
        return {}
    return versions if isinstance(versions, dict) else {}


def count_params(cfg: dict, workdir: Path | None = None) -> int:
    """Trainable parameters of a run's network, built abstractly (no memory, no compute).

    Classes and channels come from the run's dataset spec if `workdir` has one, else from the
    catalogue entry of its dataset.
    """
    from flax import nnx

    from resnet_jax import models
    from resnet_jax.data import get_info
    from resnet_jax.rundir.spec import SpecError, read_spec

    try:
        saved = read_spec(workdir) if workdir is not None else None
    except SpecError:
        saved = None  # e.g. results committed without normalization.npz: the catalogue's shape
    if saved is not None:
        num_classes, channels = saved[0].num_classes, saved[0].image_shape[-1]
    else:
        info = get_info(cfg["data"]["name"])
        num_classes, channels = info.num_classes, info.image_shape[-1]
    m = cfg["model"]
    model = nnx.eval_shape(lambda: models.build(
        m["family"], m["depth"], shortcut=m["shortcut"] or None, num_classes=num_classes,
        in_channels=channels))
    return models.count_params(model)


def _stats(values: list[float]) -> tuple[float, float, float]:
    v = np.asarray(values, float)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return float(v.mean()), std, float(v.min())


def table6(runs: list[RunResult]) -> list[dict]:
    """One row per (kind, depth): our errors over the finished seeds beside the paper's figure.

    The paper's figure is only set for CIFAR-10 residual nets (Table 6 has no plain rows, and
    another dataset's numbers are not comparable). `diff_mean` compares our mean with the paper's
    mean where it gives one (ResNet-110), else with its table figure; `diff_best` compares bests.
    """
    rows = []
    keys = sorted({(r.kind, r.depth) for r in runs}, key=lambda k: (list(KINDS).index(k[0]), k[1]))
    for kind, depth in keys:
        group = [r for r in runs if (r.kind, r.depth) == (kind, depth)]
        done = [r for r in group if r.finished and r.test_error is not None]
        params = count_params(group[0].config, group[0].workdir)
        row = {"kind": kind, "depth": depth, "params": params,
               "seeds": len(group), "finished": len(done), "dataset": group[0].dataset,
               "steps": group[0].num_steps}
        if done:
            row["test_error_mean"], row["test_error_std"], row["test_error_best"] = _stats(
                [r.test_error for r in done])
            row["train_error_mean"] = _stats([r.train_error for r in done])[0]
            row["train_error_tail"] = _stats([r.train_error_tail for r in done])[0]
            times = [r.wall_time_s for r in done if r.wall_time_s is not None]
            if times:
                row["wall_time_s_mean"] = float(np.mean(times))
        p = paper.paper_row(kind, depth) if group[0].dataset == "cifar10" else None
        if p is not None:
            row["paper_error"], row["paper_params_m"] = p.error, p.params_m
            if done:
                row["diff_mean"] = row["test_error_mean"] - (p.mean if p.mean else p.error)
                row["diff_best"] = row["test_error_best"] - p.error
        rows.append(row)
    return rows


def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    """Table 6 as markdown, with the paper's figures and a degradation summary below it."""
    lines = [
        "| model | layers | params | test error (%) mean ± std (seeds) | best | paper | "
        "ours − paper | final train error (%) | train error, last 20% of steps (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = kind_name(r["kind"])
        mean = r.get("test_error_mean")
        ours = (f"{mean:.2f} ± {r['test_error_std']:.2f} ({r['finished']})" if mean is not None
                else f"running ({r['finished']}/{r['seeds']} done)")
        p = paper.paper_row(r["kind"], r["depth"]) if "paper_error" in r else None
        paper_txt = "-"
        if p is not None:
            paper_txt = f"{p.error:.2f}" + (f" (best of {p.runs}; mean {p.mean:.2f} ± {p.std:.2f})"
                                            if p.mean else "")
        params = f"{r['params'] / 1e6:.2f}M" + (f" (paper {p.params_m}M)" if p else "")
        lines.append(f"| {name} | {r['depth']} | {params} | {ours} | "
                     f"{_fmt(r.get('test_error_best'))} | {paper_txt} | "
                     f"{_fmt(r.get('diff_mean'), '+.2f')} | {_fmt(r.get('train_error_mean'))} | "
                     f"{_fmt(r.get('train_error_tail'))} |")
    datasets = sorted({r["dataset"] for r in rows})
    notes = [f"Dataset: {', '.join(datasets)}; steps: "
             f"{', '.join(str(s) for s in sorted({r['steps'] for r in rows}))}. Test error at the "
             "final step; train error is the mean over the last logging interval (train-mode "
             "BN), and over the train records of the last 20% of the steps."]
    if datasets != ["cifar10"]:
        notes.append("The paper's figures are CIFAR-10 numbers; they are shown only for CIFAR-10 "
                     "runs.")
    notes += degradation_summary(rows)
    notes.append("Paper, plain nets (Figure 6): " + " ".join(paper.PLAIN_OBSERVATIONS))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def degradation_summary(rows: list[dict]) -> list[str]:
    """One line per kind: the training error over the last 20% of the steps, shallow to deep."""
    out = []
    for kind in KINDS:
        rs = [r for r in rows if r["kind"] == kind and r.get("train_error_tail") is not None]
        if len(rs) >= 2:
            trail = " -> ".join(f"{r['depth']}: {r['train_error_tail']:.1f}%" for r in rs)
            gap = rs[-1]["train_error_tail"] - rs[0]["train_error_tail"]
            out.append(f"{kind} train error (last 20% of steps) by depth: {trail} "
                       f"(deepest − shallowest: {gap:+.1f} points)")
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    """Table 6 as CSV with full-precision numbers (empty where unknown)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, ""))
                            for k in CSV_FIELDS})

    return atomic_write(path, write)


def run_analysis(run: RunResult, max_examples: int | None = None) -> dict:
    """Layer-response std (final checkpoint) and gradient norms (every checkpoint) of a run,
    cached in `analysis.json` in its directory until its checkpoints change."""
    from resnet_jax.ablation.analysis import analyse_run
    from resnet_jax.ablation.grid import finished_step

    ckpts = sorted(int(p.name) for p in (run.workdir / "checkpoints").iterdir()
                   if p.is_dir() and p.name.isdigit())
    key = {"version": ANALYSIS_VERSION, "checkpoints": ckpts, "max_examples": max_examples}
    cache = run.workdir / "analysis.json"
    if cache.exists():
        try:
            cached = read_json(cache, "analysis cache")
        except ValueError:
            cached = {}  # damaged: computed again below
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached
    result = {"key": key, "latest": finished_step(run.workdir),
              **analyse_run(run.workdir, max_examples)}
    atomic_write_text(cache, json.dumps(result))
    return result


def gradient_lines(analyses: dict[tuple[str, int], dict]) -> list[str]:
    """A markdown table: per net, the stem's, smallest and last layer's gradient norm at the last
    checkpoint (a vanishing gradient would show as a tiny stem/smallest value)."""
    lines = ["| model | layers | step | stem | smallest layer | last conv layer | max/min |",
             "|---|---|---|---|---|---|---|"]
    for (kind, depth), a in sorted(analyses.items()):
        g = a["gradients"]
        if not g["norms"]:
            continue
        n = g["norms"][-1]
        lines.append(f"| {kind_name(kind)} | {depth} | {g['steps'][-1]} "
                     f"| {n[0]:.3g} | {min(n):.3g} | {n[-1]:.3g} "
                     f"| {max(n) / max(min(n), 1e-30):.1f} |")
    return lines


def write_report(root: str | Path, out: str | Path | None = None, *, analysis: bool = True,
                 max_examples: int | None = None) -> list[Path]:
    """Writes Table 6 (md, csv), Figure 6 and, with `analysis`, Figure 7 and the gradient norms
    from the run directories under `root`; returns the paths written."""
    from resnet_jax.ablation import figures

    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    unreadable: list[str] = []
    runs = collect_runs(root, unreadable)
    for problem in unreadable:
        print(f"note: left out {problem}", file=sys.stderr)
    if not runs:
        raise FileNotFoundError(f"{root} holds no plain/residual run directories; run "
                                f"`resnet-jax ablate --workdir {root}` first.")
    rows = table6(runs)
    first = {}  # the lowest seed of each (kind, depth) for the figures
    for r in runs:
        first.setdefault((r.kind, r.depth), r)
    md = ("# Table 6: test error by depth, plain vs residual\n\n## Setup\n\n"
          + "\n".join(setup_lines(runs)) + "\n\n## Table 6\n\n" + markdown_table(rows))
    paths = [write_csv(rows, out / "table6.csv")]
    paths.append(figures.figure6({k: r.curves for k, r in first.items()}, out / "figure6.png"))
    if analysis:
        analyses = {k: run_analysis(r, max_examples) for k, r in first.items()
                    if (r.workdir / "checkpoints").is_dir() and r.config["model"]["scan_blocks"]
                    is False}
        paths.append(figures.figure7({k: a["responses"]["std"] for k, a in analyses.items()},
                                     out / "figure7.png"))
        paths.append(figures.gradient_norm_figure({k: a["gradients"] for k, a in analyses.items()},
                                                  out / "gradient_norms.png"))
        md += ("\n## Layer responses (Figure 7)\n\nStd of each 3x3 layer's response (after BN, "
               "before addition/ReLU) on the test set at the final checkpoint:\n\n")
        md += "\n".join(f"- {net_name(k, d)}: mean "
                        f"{np.mean(a['responses']['std']):.3f} over {len(a['responses']['std'])} "
                        f"layers" for (k, d), a in sorted(analyses.items())) + "\n"
        md += "\n## Gradient norms at the last checkpoint\n\n" + "\n".join(
            gradient_lines(analyses)) + "\n"
    atomic_write_text(out / "table6.md", md)
    return [out / "table6.md", *paths]
