"""`resnet-jax ablate` (train the depth grid) and `resnet-jax report` (Table 6 and figures)."""

from __future__ import annotations

import argparse
import sys

from resnet_jax.arguments import int_at_least, int_list, word_list


def register(subparsers) -> None:
    """Adds the `ablate` and `report` subcommands to the `resnet-jax` parser."""
    from resnet_jax.ablation.grid import DEFAULT_DEPTHS, DEFAULT_SEEDS, PARALLEL

    p = subparsers.add_parser(
        "ablate", help="train the plain/residual x depth x seed grid (He et al. 2015, Table 6)",
        description="Train every run of the grid into WORKDIR/{kind}{depth}_seed{s}/. Rerunning "
        "skips finished runs and resumes interrupted ones. --config.section.key=value overrides "
        "apply to every run.")
    p.add_argument("--config", default="cifar10",
                   help="preset: 'cifar10' uses cifar10_{resnet,plain}{depth} (the paper's recipe);"
                   " "
                   "any other preset (e.g. 'mini') gets model.family/depth/train.seed per run")
    p.add_argument("--workdir", required=True, help="grid root directory")
    p.add_argument("--depths", type=int_list(1), default=list(DEFAULT_DEPTHS),
                   help="comma-separated depths, 6n+2 (default 20,32,44,56,110)")
    p.add_argument("--kinds", type=word_list, default=["plain", "residual"],
                   help="comma-separated: plain,residual")
    p.add_argument("--seeds", type=int_list(0), default=list(DEFAULT_SEEDS),
                   help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--parallel", choices=PARALLEL, default="data-parallel",
                   help="data-parallel: runs in sequence, each over all devices; per-device: one "
                   "run per GPU side by side (sequential on CPU)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="train the seeds of each net together in one compiled program, each in "
                   "its own run directory (default: on a single GPU/TPU; not on CPU, where it "
                   "measured slower, nor on several devices); --no-pack trains them one by one")
    p.add_argument("--report", action="store_true", help="write the report when the grid is done")
    p.add_argument("--restart", action="store_true",
                   help="start unfinished runs again from step 0 (their old files are moved to "
                   "RUN/archive/), e.g. runs with no usable checkpoint")
    # Set by `--parallel per-device` for its child processes: the parent holds the grid's lock.
    p.add_argument("--grid-lock-held", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_run_ablate)

    r = subparsers.add_parser(
        "report", help="Table 6 (markdown, CSV), Figures 6 and 7 and gradient norms of a grid",
        description="Regenerate the report of a grid from its run directories (any time, also "
        "while it trains: unfinished runs are marked).")
    r.add_argument("root", help="grid root directory (as given to `ablate --workdir`)")
    r.add_argument("--out", default=None, help="output directory (default ROOT/report)")
    r.add_argument("--no-analysis", action="store_true",
                   help="skip Figure 7 and the gradient norms (they restore checkpoints)")
    r.add_argument("--max-examples", type=int_at_least(1), default=None,
                   help="test images for Figure 7 (default: the whole test set)")
    r.set_defaults(func=_run_report)


def _run_ablate(args, overrides: list[str]) -> int:
    from resnet_jax.ablation.grid import run_grid
    from resnet_jax.train import Preempted, maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
        result = run_grid(args.config, args.workdir, args.depths, args.kinds, args.seeds,
                          overrides, parallel=args.parallel, pack=args.pack,
                          restart=args.restart, lock=not args.grid_lock_held)
    except Preempted as e:
        print(f"{e} (the grid resumes with it)", file=sys.stderr)
        return e.exit_code
    print(f"Grid done: ran {len(result['ran'])}, skipped {len(result['skipped'])} finished. "
          f"Report: resnet-jax report {args.workdir}")
    if args.report:
        from resnet_jax.ablation.report import write_report

        write_report(args.workdir)
    return 0


def _run_report(args, overrides: list[str]) -> int:
    from resnet_jax.ablation.report import write_report

    if overrides:
        print("note: --config overrides are ignored by `report`", file=sys.stderr)
    paths = write_report(args.root, args.out, analysis=not args.no_analysis,
                         max_examples=args.max_examples)
    print("\n".join(f"wrote {p}" for p in paths))
    return 0
