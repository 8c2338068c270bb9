"""The `resnet-jax` command: train, and the subcommands other modules register.

Known failures (bad config, missing data, no checkpoint, divergence) print one paragraph and
exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config preset",
                       description="Train (or resume) a run. Any config value can be overridden "
                       "with --config.section.key=value, e.g. --config.model.depth=56.")
    p.add_argument("--config", default="quick",
                   help="preset name (see `resnet-jax configs`) or a path to a .py config file")
    p.add_argument("--workdir", required=True, help="run directory (resumes if it holds a run)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run even if its saved config differs")
    p.add_argument("--restart", action="store_true",
                   help="start the run in --workdir again from step 0; its old files are moved "
                   "to WORKDIR/archive/ (e.g. when no checkpoint is usable)")
    p.set_defaults(func=_run_train)


def _run_train(args, overrides: list[str]) -> int:
    from resnet_jax.config import load_config
    from resnet_jax.train import Preempted, maybe_initialize_distributed, train_and_evaluate

    # Validate first: a bad value must not wait for a coordinator or the other processes.
    config = load_config(args.config, overrides)
    maybe_initialize_distributed()
    try:
        result = train_and_evaluate(config, args.workdir,
                                    allow_config_change=args.allow_config_change,
                                    restart=args.restart)
    except Preempted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in result.items())
    print(f"Done: {summary}. Run directory: {args.workdir}")
    return 0


def _add_configs(sub) -> None:
    p = sub.add_parser("configs", help="list the config presets, or print one")
    p.add_argument("name", nargs="?", help="a preset to print in full")
    p.set_defaults(func=_run_configs)


def _run_configs(args, overrides: list[str]) -> int:
    from resnet_jax.config import (
        ConfigError,
        apply_overrides,
        available_presets,
        get_preset,
        preset_obstacle,
        validate,
    )

    if args.name:
        config = apply_overrides(get_preset(args.name), overrides)
        print(config)
        try:
            validate(config)
        except ConfigError as e:  # shown, so a preset that cannot run yet can still be read
            print(f"(cannot run yet: {e})", file=sys.stderr)
        return 0
    for name in available_presets():
        why = preset_obstacle(name)
        print(name if why is None else f"{name}  (cannot run yet: {why})")
    return 0


COMMANDS = [_add_train, _add_configs]
# Modules that add subcommands with a `register(subparsers)` function (ablate, evaluate, bench...).
PLUGIN_MODULES = ("resnet_jax.ablation.cli", "resnet_jax.inference.cli", "resnet_jax.bench.cli",
                  "resnet_jax.convert.cli")


def _plugins():
    import importlib

    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that part of the package is not installed in this checkout
            raise
        # A module without register() (e.g. one still being written) adds no subcommand; it
        # must not take the whole command line down with an AttributeError.
        register = getattr(module, "register", None)
        if register is not None:
            yield register


def _known_errors() -> tuple[type[BaseException], ...]:
    from resnet_jax.config import ConfigError
    from resnet_jax.data import DatasetNotFoundError
    from resnet_jax.rundir.lock import WorkdirLockedError
    from resnet_jax.train import CheckpointError, DivergenceError

    # OSError covers FileNotFoundError, PermissionError and WriteError (e.g. a full disk).
    return (ConfigError, DatasetNotFoundError, CheckpointError, DivergenceError, ValueError,
            OSError, NotImplementedError, WorkdirLockedError)


def format_error(e: BaseException) -> str:
    """An error as the one paragraph the CLI prints: `error: ...` with whitespace collapsed."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"error: {text}"


def _quiet_library_logs() -> None:
    """Hides Orbax's own error logs (with tracebacks from its background threads).

    Every failure they describe reaches the user as our one-paragraph error; `--debug` keeps
    them for a bug report.
    """
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)


def _configure_cpu() -> None:
    """The fast-CPU XLA flags (resnet_jax/backends/xla_flags.py), unless jax is already running."""
    from resnet_jax.backends.xla_flags import backend_initialized, configure_cpu

    if not backend_initialized():
        configure_cpu()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `resnet-jax` console script (`argv=None`: this process's arguments)."""
    if argv is None:  # A program start, not a call from Python: pick the fast malloc first.
        from resnet_jax.backends.xla_flags import reexec_with_malloc_tuning

        reexec_with_malloc_tuning()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="resnet-jax", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (*COMMANDS, *_plugins()):
        add(sub)
    # --config.x.y=v overrides are collected here, not by argparse.
    overrides = [a for a in argv if a.startswith("--config.")]
    args, unknown = parser.parse_known_args([a for a in argv if not a.startswith("--config.")])
    if args.command == "bench":  # the bench parses its own flags
        args.bench_args = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command != "bench":  # the bench sets (or skips) the CPU flags from its own options
        _configure_cpu()
    if not args.debug:
        _quiet_library_logs()
    try:
        return args.func(args, overrides)
    except _known_errors() as e:
        if args.debug:
            raise
        print(format_error(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        # Outside the training loop (which saves and says so): nothing to save yet.
        print(f"Interrupted (Ctrl-C); `resnet-jax {args.command}` stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
