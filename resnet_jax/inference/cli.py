"""`resnet-jax evaluate | predict | export`: use a trained run without writing code."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from resnet_jax.arguments import int_at_least


def _quiet_orbax() -> None:
    # Orbax warns on every read-only restore ("directory is read only"); not news to a user.
    logging.getLogger("absl").setLevel(logging.ERROR)


def _add_checkpoint_choice(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int_at_least(0), help="checkpoint step (default: the newest)")
    g.add_argument("--best", action="store_true",
                   help="the checkpoint with the lowest validation error")


def register(sub) -> None:
    """Adds the evaluate, predict and export subcommands to the `resnet-jax` parser."""
    p = sub.add_parser("evaluate", help="score a checkpoint on a whole split",
                       description="Restore a checkpoint of a run, score every example of a "
                       "split, print top-1/top-5 error and per-class accuracy, and write a "
                       "JSON summary and a confusion-matrix PNG.")
    p.add_argument("--workdir", required=True, help="run directory")
    _add_checkpoint_choice(p)
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument("--out", help="output directory (default: WORKDIR/eval)")
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("predict", help="classify image files",
                       description="Classify images (files or folders, searched recursively) "
                       "with a run's checkpoint or an exported model. Images are converted to "
                       "the training size and channels and normalised like the training data; "
                       "a run trained at config.data.image_size resizes and centre-crops them "
                       "exactly as its evaluation did.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory")
    src.add_argument("--model", help="a model file written by `resnet-jax export`")
    _add_checkpoint_choice(p)
    p.add_argument("--top-k", type=int_at_least(1), default=5, help="classes to print per image")
    p.add_argument("--batch-size", type=int_at_least(1), default=256,
                   help="images per batch (rounded up to a multiple of the device count)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.set_defaults(func=run_predict)

    p = sub.add_parser("export", help="write a checkpoint as one self-describing model file",
                       description="Write a checkpoint's weights, BN statistics, normalisation "
                       "statistics and class names (no optimiser state) to a safetensors file "
                       "that `resnet-jax predict --model` and `resnet_jax.load` accept.")
    p.add_argument("--workdir", required=True, help="run directory")
    _add_checkpoint_choice(p)
    p.add_argument("--out", help="output file (default: WORKDIR/export/step_<N>.safetensors)")
    p.set_defaults(func=run_export)


def run_evaluate(args, overrides: list[str]) -> int:
    """`resnet-jax evaluate`: prints metrics and per-class accuracy, writes JSON and PNG."""
    from resnet_jax.inference.evaluate import evaluate_run

    _no_overrides("evaluate", overrides)
    _quiet_orbax()
    _note_live_run(args.workdir)
    s = evaluate_run(args.workdir, step=args.step, best=args.best, split=args.split,
                     out_dir=args.out)
    print(f"{s['run']} step {s['step']}, {s['split']} split of {s['dataset']} "
          f"({s['count']} examples)")
    print(f"  top-1 error {s['error']:.2f}%   top-5 error {s['top5_error']:.2f}%   "
          f"loss {s['loss']:.4f}")
    logged = s["logged"]
    if logged is not None:
        same = (logged.get("error") == s["error"]
                and abs(logged.get("loss", float("nan")) - s["loss"]) <= 1e-5)
        print(f"  training log at this step: top-1 error {logged.get('error'):.2f}%, loss "
              f"{logged.get('loss'):.4f} ({'identical' if same else 'DIFFERENT'})")
    width = max(len(c["name"]) for c in s["per_class"])
    print("Per-class accuracy:")
    for c in s["per_class"]:
        acc = "   n/a" if c["accuracy"] is None else f"{c['accuracy']:6.2f}%"
        print(f"  {c['class']:>3} {c['name']:<{width}}  {acc}  ({c['count']})")
    print(f"Wrote {s['files']['json']} and {s['files']['confusion_png']}")
    return 0


def run_predict(args, overrides: list[str]) -> int:
    """`resnet-jax predict`: top-k classes per image; exit 1 if any image could not be read."""
    from resnet_jax.inference.images import expand_paths
    from resnet_jax.inference.loading import load

    _no_overrides("predict", overrides)
    _quiet_orbax()
    files, skipped = expand_paths(args.images)
    if not files:
        raise FileNotFoundError(f"no image files found in {', '.join(args.images)}")
    clf = load(args.workdir or args.model, step=args.step, best=args.best,
               batch_size=args.batch_size)
    if skipped:
        print(f"note: skipped {len(skipped)} non-image file(s), e.g. {skipped[0]}",
              file=sys.stderr)
    failed = 0
    for p in clf.iter_predict(files, top_k=args.top_k):
        if p.error is not None:
            failed += 1
            print(f"error: {p.error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"file": p.source, "top": [[n, pr] for n, pr in p.top]}))
        else:
            print(f"{p.source}: " + ", ".join(f"{n} {100 * pr:.1f}%" for n, pr in p.top))
        sys.stdout.flush()
    if failed:
        print(f"{failed} of {len(files)} image(s) could not be classified.", file=sys.stderr)
    return 1 if failed else 0


def run_export(args, overrides: list[str]) -> int:
    """`resnet-jax export`: writes the chosen checkpoint as a safetensors model file."""
    from pathlib import Path

    from resnet_jax.inference.loading import from_run

    _no_overrides("export", overrides)
    _quiet_orbax()
    clf = from_run(args.workdir, step=args.step, best=args.best)
    default = Path(args.workdir) / "export" / f"step_{clf.step}.safetensors"
    out = Path(args.out) if args.out else default
    path = clf.export(out)
    print(f"Exported step {clf.step} of {args.workdir} ({clf.model_config.family} depth "
          f"{clf.model_config.depth}, {clf.num_classes} classes) to {path} "
          f"({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _note_live_run(workdir: str) -> None:
    """Says so when a run is being trained: its checkpoints are read as they stand now."""
    from resnet_jax.rundir.lock import describe_holder, holder

    info = holder(workdir)
    if info is not None:
        print(f"note: {workdir} is being trained now ({describe_holder(info)}); using its "
              "checkpoints as they stand.", file=sys.stderr)


def _no_overrides(command: str, overrides: list[str]) -> None:
    # The run's saved config defines the model and data; silently ignoring an override would
    # suggest it took effect.
    if overrides:
        raise ValueError(f"`resnet-jax {command}` uses the run's saved config; "
                         f"--config overrides ({overrides[0]}, ...) are not accepted.")
