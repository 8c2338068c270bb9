"""`resnet-jax bench` / `scripts/bench.py`: command line, table, JSON.

`main` configures XLA's CPU backend (resnet_jax.backends.xla_flags.configure_cpu) *before*
importing jax, so call it before anything in the process has run a jax computation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The bench's flags."""
    ap = argparse.ArgumentParser(
        prog="resnet-jax bench",
        description="Time train/eval steps (compile, step time, img/s, FLOPs, memory), "
        "optionally against the PyTorch twin (own process, alternating windows).",
    )
    ap.add_argument("--models", type=_csv, default=["resnet20", "resnet56"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dtypes", type=_csv, default=["float32"], help="float32,bfloat16")
    ap.add_argument("--vs-torch", action="store_true",
                    help="interleave windows of the PyTorch twin (benchmarks/torch_resnet.py)")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--compile-only-models", type=_csv, default=[],
                    help="models whose train step is only compiled (e.g. resnet110,resnet1202)")
    ap.add_argument("--run-compile-only", action="store_true",
                    help="also run compile-only models for two steps (proves they fit in memory)")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per step kind")
    ap.add_argument("--train-steps", type=int, default=5, help="train steps per window")
    ap.add_argument("--eval-steps", type=int, default=10, help="eval steps per window")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the windows")
    ap.add_argument("--data-steps", type=int, default=50,
                    help="batches per window of the data-only loop (built in one call)")
    ap.add_argument("--scan-blocks", action="store_true",
                    help="time scanned stages (default unrolled; compile-only models always scan)")
    ap.add_argument("--remat", choices=("auto", "on", "off"), default="auto",
                    help="rematerialise each block in the backward pass (auto: depth > 110)")
    ap.add_argument("--steps-per-call", type=int, default=None,
                    help="also time the library's train step with data on the devices, K steps "
                    "per host call (lax.scan), and project the paper's 64k-step run (0: off; "
                    "default: 100 on GPU/TPU, off on CPU)")
    ap.add_argument("--loop-calls", type=int, default=2,
                    help="host calls per timed window of the --steps-per-call rows")
    ap.add_argument("--backend", choices=("auto", "plain", "xla_cpu", "onednn"), default="auto",
                    help="the layers' implementation (resnet_jax.backends; auto: the faster "
                    "CPU path on this processor, plain on GPU/TPU)")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="simulated host devices on CPU (default: "
                    "resnet_jax.backends.xla_flags's choice)")
    ap.add_argument("--no-cpu-flags", action="store_true",
                    help="leave XLA_FLAGS as they are (measure XLA's defaults)")
    ap.add_argument("--image-size", type=_positive, default=224,
                    help="input size of the ImageNet-family models (resnet18..152) and of the "
                    "input pipeline's crops")
    ap.add_argument("--no-input-pipeline", dest="input_pipeline", action="store_false",
                    help="skip the streaming input pipeline's rows")
    ap.add_argument("--input-dir", default=None,
                    help="an ImageNet-layout class folder (train/<class>/*.JPEG) for the input "
                    "pipeline's rows (default: generate --input-images JPEGs in a temp dir)")
    ap.add_argument("--input-images", type=_positive, default=256,
                    help="JPEGs generated for the input pipeline's rows (300-500 px, q90)")
    ap.add_argument("--input-threads", type=_positive, default=None,
                    help="the input pipeline's threads besides 1 (default: "
                    "config.data.stream_threads' default, one per CPU)")
    ap.add_argument("--input-batches-per-thread", type=_positive, default=3,
                    help="batches per thread in each timed window of the input pipeline")
    args = ap.parse_args(argv)
    if args.input_dir is not None:
        # Checked here, before the models' rows spend minutes: the folder is read last.
        # (Not resnet_jax.data's own check: importing it imports jax before configure_cpu.)
        path = Path(args.input_dir).expanduser()
        if not (path.is_file() or (path / "train").is_dir()
                or any((d / "train").is_dir() for d in _subdirs(path))):
            ap.error(f"--input-dir {args.input_dir!r} is not a class folder: it needs "
                     "train/<class>/*.JPEG (directly or under one top folder), or a .tar of it")
    return args


def _subdirs(path: Path) -> list[Path]:
    return [d for d in path.iterdir() if d.is_dir()] if path.is_dir() else []


def _positive(s: str) -> int:
    value = int(s)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s}")
    return value


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict) -> str:
    """The human-readable tables of a report from `resnet_jax.bench.runner.run`."""
    peak = report["matmul_peak_flops"]
    lines = [
        f"backend {report['backend']}, {len(report['devices'])} device(s), "
        f"{report['cpu_count']} CPU(s), jax {report['jax']}",
        f"XLA_FLAGS: {report['xla_flags'] or '(none)'}",
        f"GLIBC_TUNABLES: {report.get('glibc_tunables') or '(none)'}",
        f"float32 matmul peak (2048^2, same run): {peak / 1e9:.1f} GFLOP/s",
        "",
    ]
    head = (f"{'model':<10} {'dtype':<8} {'step':<5} {'compile s':>9} {'ms/step [min-max]':>22} "
            f"{'img/s':>7} {'GFLOP':>6} {'GFLOP/s':>7} {'%peak':>5} {'torch img/s':>11} "
            f"{'ours/torch [min-max]':>21} {'host MiB':>8}")
    lines += [head, "-" * len(head)]
    notes = []
    for r in report["rows"]:
        ms = (f"{r['step_s_median'] * 1e3:.1f} [{r['step_s_min'] * 1e3:.0f}-"
              f"{r['step_s_max'] * 1e3:.0f}]")
        t = r.get("torch")
        ratio = (f"{r['ratio_vs_torch']:.2f} [{r['ratio_vs_torch_min']:.2f}-"
                 f"{r['ratio_vs_torch_max']:.2f}]" if t else "-")
        flops = r.get("flops_per_step")
        frac = r.get("fraction_of_matmul_peak")
        lines.append(
            f"{r['model']:<10} {r['dtype']:<8} {r['step']:<5} {r['trace_and_compile_s']:>9.1f} "
            f"{ms:>22} {r['images_per_s']:>7.1f} {_fmt(flops and flops / 1e9):>6} "
            f"{_fmt(r.get('achieved_flops') and r['achieved_flops'] / 1e9):>7} "
            f"{_fmt(frac and 100 * frac, '.0f'):>5} {_fmt(t and t['images_per_s']):>11} "
            f"{ratio:>21} {r['peak_host_memory_bytes'] / 2**20:>8.0f}"
        )
        tc = r.get("torch_compile")
        if tc:
            lines.append(
                f"{'':<10} {'':<8} {'':<5} {'torch.compile':>32} {tc['images_per_s']:>21.1f} "
                f"ours/compiled {r['ratio_vs_torch_compile']:.2f} "
                f"[{r['ratio_vs_torch_compile_min']:.2f}-{r['ratio_vs_torch_compile_max']:.2f}]")
        if r.get("streamed") and r["step"] == "train":
            notes.append(f"{r['model']} {r['dtype']}: the imagenet_resnet50 preset, 1000 "
                         f"classes, {r['image_size']} px batches as the streaming pipeline "
                         "delivers them (cropped on the host, normalised in the step)")
        if "fraction_of_device_flops" in r or "fraction_of_device_bytes" in r:
            notes.append(f"{r['model']} {r['dtype']} {r['step']}: "
                         f"{_fmt(100 * r.get('fraction_of_device_flops', 0), '.1f')}% of the "
                         f"device's FLOP/s peak, "
                         f"{_fmt(100 * r.get('fraction_of_device_bytes', 0), '.1f')}% of its "
                         "memory bandwidth")
    rows = report["rows"]
    if rows:
        backends = sorted({r.get("backend", "?") for r in rows})
        lines += ["", f"layers: backend {', '.join(backends)}; convolution precision: ours "
                  f"{rows[0].get('precision', '?')}"
                  + (f", PyTorch {rows[0]['torch']['precision']}" if rows[0].get("torch")
                     else "")]
    lines += notes
    d = report["data_pipeline"]
    versus = (f" = {_fmt(d['ratio_vs_best_train'])}x the fastest train step above (needs >= "
              "10x)" if d["ratio_vs_best_train"] is not None else "")
    lines += ["", f"data pipeline only (gather+normalise+crop+flip, batch {d['batch_size']}): "
              f"{d['images_per_s']:.0f} img/s{versus}"]
    loop_rows = report.get("loop") or []
    if loop_rows:
        lines += ["", "library train step (resnet_jax.train.step: data on the devices, crop+flip "
                  "in the step), several steps per host call:",
                  f"{'model':<10} {'dtype':<8} {'steps/call':>10} {'compile s':>9} "
                  f"{'ms/step [min-max]':>22} {'img/s':>8} {'paper run (64k steps)':>22}"]
        for r in loop_rows:
            ms = (f"{r['step_s_median'] * 1e3:.2f} [{r['step_s_min'] * 1e3:.2f}-"
                  f"{r['step_s_max'] * 1e3:.2f}]")
            proj = r["projected_paper_run_s"]
            lines.append(
                f"{r['model']:<10} {r['dtype']:<8} {r['steps_per_call']:>10} "
                f"{r['trace_and_compile_s']:>9.1f} {ms:>22} {r['images_per_s']:>8.0f} "
                f"{f'{proj / 60:.1f} min ({proj / 3600:.2f} h)':>22}"
            )
    lines += format_input_pipeline(report.get("input_pipeline"))
    compile_rows = report["compile_only"]
    if compile_rows:
        base = compile_rows[0]["trace_and_compile_s"]
        lines += ["", "train step compile time, scanned stages (f32):",
                  f"{'model':<20} {'trace s':>7} {'compile s':>9} {'total s':>7} "
                  f"{'x first':>7} {'remat':>5} {'XLA temp MiB/dev':>16} {'1 step s':>8}"]
        for r in compile_rows:
            mem = r.get("xla_memory_per_device") or {}
            temp = mem.get("temp_size_in_bytes")
            lines.append(
                f"{r['model']:<20} {r['lower_s']:>7.1f} {r['compile_s']:>9.1f} "
                f"{r['trace_and_compile_s']:>7.1f} {r['trace_and_compile_s'] / base:>7.2f} "
                f"{str(r['remat']):>5} {_fmt(temp and temp / 2**20, '.0f'):>16} "
                f"{_fmt(r.get('one_step_s')):>8}"
            )
    return "\n".join(lines)


def format_input_pipeline(inp: dict | None) -> list[str]:
    """The input pipeline's table and the cores each ImageNet train row needs (no lines when
    the report has no input rows)."""
    if not inp:
        return []
    gen = inp.get("generated")
    source = (f"{gen['images']} generated JPEGs, {gen['sides'][0]}-{gen['sides'][1]} px, "
              f"q{gen['quality']}, mean {gen['mean_file_bytes'] / 1024:.0f} KB" if gen
              else f"{inp['num_train']} images in {inp['data_dir']}")
    rows = inp["rows"]
    load = inp.get("load_average") or []
    lines = ["", f"input pipeline (resnet_jax.data.stream, {inp['transform']} to "
             f"{inp['image_size']} px, batch {rows[0]['batch_size']}; {source}):",
             f"{'threads':>7} {'img/s [min-max]':>22} {'img/s per thread':>16} "
             f"{'img/s per CPU-s':>15}"]
    for r in rows:
        rate = (f"{r['images_per_s']:.0f} [{r['images_per_s_min']:.0f}-"
                f"{r['images_per_s_max']:.0f}]")
        lines.append(f"{r['threads']:>7} {rate:>22} {r['images_per_s_per_thread']:>16.0f} "
                     f"{r['images_per_cpu_s']:>15.0f}")
    lines.append(f"img/s per CPU core: {inp['images_per_s_per_core']:.0f} (images per second "
                 f"of CPU time at {rows[-1]['threads']} thread(s); {inp['cpu_count']} CPU(s)"
                 + (f", load average {load[0]:.1f} -> {load[-1]:.1f}" if load else "") + ")")
    for f in inp.get("feeding") or []:
        lines.append(f"CPU cores needed to feed it: {f['model']} {f['dtype']} train "
                     f"{f['train_images_per_s']:.0f} img/s / {inp['images_per_s_per_core']:.0f} "
                     f"img/s per core = {f['cores_needed']:.1f} cores")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of `resnet-jax bench`; returns the process exit status."""
    args = parse_args(argv)
    if not args.no_cpu_flags:
        from resnet_jax.backends.xla_flags import configure_cpu

        configure_cpu(args.cpu_devices)
    from resnet_jax.bench.runner import BenchConfig, run

    cfg = BenchConfig(
        models=args.models, compile_only_models=args.compile_only_models,
        batch_size=args.batch_size, dtypes=args.dtypes, vs_torch=args.vs_torch,
        windows=args.windows, train_steps=args.train_steps, eval_steps=args.eval_steps,
        warmup=args.warmup, scan_blocks=args.scan_blocks, remat=args.remat,
        data_steps=args.data_steps, run_compile_only=args.run_compile_only,
        steps_per_call=args.steps_per_call, loop_calls=args.loop_calls,
        backend=args.backend, image_size=args.image_size, input_pipeline=args.input_pipeline,
        input_dir=args.input_dir, input_images=args.input_images,
        input_threads=args.input_threads,
        input_batches_per_thread=args.input_batches_per_thread,
    )
    report = run(cfg)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Adds `resnet-jax bench`; its flags are parsed by `parse_args` (see `resnet-jax bench -h`)."""
    # add_help=False: `resnet-jax bench --help` reaches `parse_args`, which knows the flags.
    p = subparsers.add_parser("bench", add_help=False, help="time train/eval steps (vs PyTorch)")
    p.set_defaults(func=lambda args, overrides: main(args.bench_args))
