"""`resnet-jax convert`: PyTorch ResNet weights to our model files, and ImageNet nets back."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    """Adds the convert subcommand to the `resnet-jax` parser."""
    from resnet_jax.convert.files import EXPORT_LAYOUTS, LAYOUTS

    p = sub.add_parser(
        "convert", help="convert PyTorch ResNet weights to a model file, or back",
        description="--from LAYOUT FILE: read a PyTorch checkpoint (akamaster's CIFAR ResNets, "
        "torchvision's ImageNet ResNets) and write a model file that `resnet-jax predict "
        "--model` and `resnet_jax.load` accept and `--config.train.init_from` fine-tunes. "
        "--to torchvision SOURCE: write a run's or model file's ImageNet ResNet as a state_dict "
        "that torchvision's resnet{18..152}() loads with strict=True. Needs torch: "
        "pip install 'resnet-jax[torch]'.")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_layout", choices=tuple(LAYOUTS),
                           help="the layout of the PyTorch checkpoint SOURCE")
    direction.add_argument("--to", dest="to_layout", choices=EXPORT_LAYOUTS,
                           help="write SOURCE (a run directory or model file) in this layout")
    p.add_argument("source", help="a .th/.pth checkpoint (--from), or a run directory or "
                   "model file (--to)")
    p.add_argument("--out", required=True, help="the file to write (.safetensors for --from, "
                   ".pth for --to)")
    p.add_argument("--model", help="with --from: the net, e.g. resnet20 or resnet50 (default: "
                   "the depth the checkpoint's keys show)")
    p.add_argument("--class-names", help="with --from: a text file with one class name per "
                   "line (default: CIFAR-10's or ImageNet's for 10 or 1000 classes, else numbers)")
    p.set_defaults(func=run_convert)


def _read_class_names(path: str) -> tuple[str, ...]:
    lines = Path(path).read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _describe_stats(mean, std) -> str:
    import numpy as np

    mean, std = np.asarray(mean), np.asarray(std)
    if mean.ndim == 1:
        scaled = [tuple(round(float(v), 4) for v in x / 255) for x in (mean, std)]
        return f"RGB on [0, 1] normalised with mean {scaled[0]} and std {scaled[1]}"
    return (f"a per-pixel mean image of shape {list(mean.shape)} subtracted and divided by "
            f"{tuple(float(s) for s in std)} on the 0..255 scale (the run's normalisation)")


def run_convert(args, overrides: list[str]) -> int:
    """`resnet-jax convert`: one conversion, one summary line."""
    from resnet_jax.convert.files import convert_torch_file, export_torchvision

    if overrides:
        raise ValueError(f"`resnet-jax convert` takes no --config overrides ({overrides[0]}).")
    try:
        if args.from_layout:
            names = _read_class_names(args.class_names) if args.class_names else None
            clf = convert_torch_file(args.source, args.from_layout, args.out, model=args.model,
                                     class_names=names)
            m = clf.model_config
            shown = ", ".join(clf.class_names[:4]) + (", ..." if clf.num_classes > 4 else "")
            print(f"Converted {args.source} ({args.from_layout}) to {args.out}: {m.family} depth "
                  f"{m.depth}, {clf.num_classes} classes ({shown}); inputs "
                  f"{_describe_stats(*clf.stats)}.")
            return 0
        if args.model or args.class_names:
            raise ValueError("--model and --class-names apply only to --from.")
        clf = export_torchvision(args.source, args.out)
        depth, n = clf.model_config.depth, clf.num_classes
        print(f"Wrote {args.out}: torchvision.models.resnet{depth}(num_classes={n}) loads it "
              f"with load_state_dict(torch.load(...), strict=True); inputs "
              f"{_describe_stats(*clf.stats)}.")
        return 0
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
