"""Scoring a run's checkpoint on a whole split: metrics, per-class accuracy, confusion matrix.

Uses the training code's own eval step, batch size and normalisation, so the numbers equal
those `metrics.jsonl` logged for the same step and split. A run trained with the streaming
pipeline is scored as its training evaluated: images read, decoded and centre-cropped by Grain
batch by batch, so a split of any size and images of any size can be scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_jax.data import DataSpec, NormStats
from resnet_jax.rundir.files import atomic_write, atomic_write_json, read_json
from resnet_jax.rundir.metrics import find_record

SPLITS = ("test", "validation")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [true, predicted] counts."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


def logged_metrics(workdir: str | Path, step: int, split: str) -> dict | None:
    """The record metrics.jsonl holds for `step` and `split` (the last one logged), or None."""
    return find_record(workdir, step, split)


def plot_confusion(cm: np.ndarray, class_names: tuple[str, ...], title: str,
                   path: str | Path) -> Path:
    """Writes a row-normalised confusion-matrix heat map (counts annotated if few classes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe on headless machines
    import matplotlib.pyplot as plt

    n = len(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = cm / np.maximum(rows, 1)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def trained_streamed(workdir: str | Path, config: ml_collections.ConfigDict) -> bool:
    """Whether the run's input was streamed: its config resolves to the stream, or "auto" fell
    back to it for lack of device memory (versions.json's `pipeline` says so)."""
    from resnet_jax.data.stream import resolve_pipeline

    if resolve_pipeline(config.data) == "stream":
        return True
    try:
        versions = read_json(Path(workdir) / "versions.json", "versions file")
    except (OSError, ValueError):  # absent (older runs) or damaged: the config decides
        return False
    return isinstance(versions, dict) and versions.get("pipeline") == "stream"


def check_same_data(name: str, found: DataSpec, trained: DataSpec) -> None:
    """Raises ValueError unless the data found now has the run's classes and image shape, so
    that labels mean what they meant in training."""
    if (tuple(found.class_names) != tuple(trained.class_names)
            or tuple(found.image_shape) != tuple(trained.image_shape)):
        raise ValueError(
            f"the {name} data found now has classes {list(found.class_names)} and images "
            f"{tuple(found.image_shape)}, but the run was trained on classes "
            f"{list(trained.class_names)} and images {tuple(trained.image_shape)}")


def streamed_split(config: ml_collections.ConfigDict, split: str, spec: DataSpec,
                   stats: NormStats, mesh: Mesh) -> tuple[Iterator[tuple], int, list[np.ndarray]]:
    """`(batches, size, labels)` of a streamed run's split: global `(images, labels, mask)`
    device batches covering it once (the last padded and masked), its number of examples, and
    a list that receives each batch's real labels as the batches are read."""
    from resnet_jax.data import stream
    from resnet_jax.data.sharding import shard_local_batch

    if split == "test":  # class folders: only test/ (or val/) is listed and needed
        splits = stream.open_held_out(config.data, spec, stats)
    else:  # the validation split is carved from train/
        splits = stream.open_stream(config.data, stats=stats)  # the run's stats: no sampling
    check_same_data(config.data.name, splits.spec, spec)
    size = len(splits.validation if split == "validation" else splits.test)
    labels: list[np.ndarray] = []

    def batches() -> Iterator[tuple]:
        for images, y, mask in stream.read_eval(
                splits, split, config.train.eval_batch_size, stream.threads(config.data),
                process_index=jax.process_index(), process_count=jax.process_count()):
            labels.append(np.asarray(y)[np.asarray(mask)])
            yield shard_local_batch((images, y, mask), mesh)

    return batches(), size, labels


def evaluate_run(workdir: str | Path, step: int | None = None, best: bool = False,
                 split: str = "test", out_dir: str | Path | None = None) -> dict:
    """Scores every example of `split` with a checkpoint of the run in `workdir`.

    Returns (and writes to `out_dir`, default `workdir/eval/`) a summary: loss, top-1/top-5
    error (%), per-class accuracy, the confusion matrix, the values the run logged for the same
    step and split (if any), and the paths of the JSON file and the confusion-matrix PNG.
    """
    from resnet_jax.data import load_split, replicate
    from resnet_jax.train import evaluate_split, make_eval_step, restore_model
    from resnet_jax.train.evaluation import evaluate_batches

    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of {SPLITS}")
    workdir = Path(workdir).absolute()
    config, spec, stats, state, eval_def, mesh = restore_model(workdir, step=step, best=best)
    if split == "validation" and not config.data.validation_size:
        raise ValueError(f"the validation split of {spec.name} is empty in this run "
                         f"(config.data.validation_size={config.data.validation_size}).")
    step = int(state.step)
    eval_step = jax.jit(make_eval_step(eval_def))
    # Same batch size and replicated stats as the training loop: identical batches, same sums.
    # Only the scored split's data is read; the statistics are the run's own.
    if trained_streamed(workdir, config):
        batches, size, read_labels = streamed_split(config, split, spec, stats, mesh)
        r = evaluate_batches(eval_step, state, batches, replicate(stats, mesh), size,
                             return_logits=True)
        labels = np.concatenate(read_labels) if read_labels else np.zeros((0,), np.int32)
    else:
        images, labels = load_split(config.data, split, spec)
        r = evaluate_split(eval_step, state, images, labels, replicate(stats, mesh),
                           config.train.eval_batch_size, mesh, return_logits=True)
    names = tuple(spec.class_names)
    cm = confusion_matrix(labels, np.argmax(r["logits"], axis=-1), spec.num_classes)
    counts = cm.sum(axis=1)
    per_class = [{"class": i, "name": names[i], "count": int(counts[i]),
                  "accuracy": 100.0 * float(cm[i, i]) / counts[i] if counts[i] else None}
                 for i in range(len(names))]
    out = Path(out_dir) if out_dir is not None else workdir / "eval"
    stem = f"{split}_step{step}"
    png = plot_confusion(cm, names, f"{spec.name} {split}, step {step}: "
                         f"top-1 error {r['error']:.2f}%", out / f"{stem}_confusion.png")
    summary = {
        "run": str(workdir),
        "step": step,
        "split": split,
        "dataset": spec.name,
        "count": int(r["count"]),
        "loss": r["loss"],
        "error": r["error"],
        "top5_error": r["top5_error"],
        "per_class": per_class,
        "class_names": list(names),
        "confusion_matrix": cm.tolist(),
        "logged": logged_metrics(workdir, step, split),
        "files": {"json": str(out / f"{stem}.json"), "confusion_png": str(png)},
    }
    atomic_write_json(out / f"{stem}.json", summary, indent=1)
    return summary
