"""Runs one training process for the subprocess tests (fault injection, multi-process).

    python tests/helpers_train_proc.py [--cli] WORKDIR [section.key=value ...]

Starts from the `quick` preset (or $RESNET_JAX_TEST_PRESET) with the given overrides; with
--cli, through `resnet-jax train` (its messages and exit status), else by calling
`train_and_evaluate`. Prints
`MARK <event> <step>` lines (flushed) that the tests wait for before killing the process:
  restoring N / resumed N around the restore of the latest checkpoint (N: its step)
  start N                 training starts (or resumes) at step N
  saving N                an async checkpoint save of step N has started (writing in background)
  finalizing N            Orbax is about to commit step N (data written, not yet renamed)
  logged N                the train metrics of step N were written (between steps)
  waiting N               paused after logging step N until a file appears (see below)
  done N                  the run finished at step N
Test hooks, read from the environment (the library itself has none):
  RESNET_JAX_TEST_FINALIZE_DELAY  STEP:SECONDS, sleep before committing STEP (a kill lands there)
  RESNET_JAX_TEST_LOG_PAUSE       STEP:SECONDS, sleep after logging the train record of STEP
  RESNET_JAX_TEST_LOG_WAIT        STEP:FILE[,STEP:FILE], after logging the train record of STEP,
                                  wait until FILE exists (the test creates it to continue)
  RESNET_JAX_TEST_CACHE           a persistent XLA compilation cache directory (faster restarts)
Multi-process runs set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time


def mark(event: str, value) -> None:
    """One marker line for the parent test."""
    print(f"MARK {event} {value}", flush=True)


def install_hooks() -> None:
    """Wraps the checkpointer, Orbax's commit and the logger to print markers (and pause)."""
    from orbax.checkpoint._src.path import atomicity

    import resnet_jax.train.loop as loop

    # "STEP:SECONDS": only the commit of that step waits.
    delay_step, _, delay = os.environ.get("RESNET_JAX_TEST_FINALIZE_DELAY", ":0").partition(":")
    delay = float(delay)
    pause_step, _, pause = os.environ.get("RESNET_JAX_TEST_LOG_PAUSE", ":0").partition(":")
    pause = float(pause)
    waits = dict(item.split(":", 1) for item in
                 os.environ.get("RESNET_JAX_TEST_LOG_WAIT", "").split(",") if item)
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self):
        name = self.get_final().name
        mark("finalizing", name)
        if delay and name == delay_step:
            await asyncio.sleep(delay)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize

    class MarkedCheckpointer(loop.Checkpointer):
        def save(self, state, metrics=None, force=False, **kwargs):
            saved = super().save(state, metrics, force, **kwargs)
            mark("saving", int(state.step))
            return saved

        def restore(self, target, step=None, **kwargs):
            mark("restoring", self.latest_step())
            state = super().restore(target, step, **kwargs)
            mark("resumed", int(state.step))
            return state

    class MarkedLogger(loop.MetricsLogger):
        def __init__(self, workdir, total_steps, start_step, *args, **kwargs):
            super().__init__(workdir, total_steps, start_step, *args, **kwargs)
            mark("start", start_step)

        def write(self, step, split, metrics):
            super().write(step, split, metrics)
            if split == "train":
                mark("logged", step)
                if pause and str(step) == pause_step:
                    time.sleep(pause)
                if str(step) in waits:
                    mark("waiting", step)
                    while not os.path.exists(waits[str(step)]):
                        time.sleep(0.05)

    loop.Checkpointer = MarkedCheckpointer
    loop.MetricsLogger = MarkedLogger


def main(argv: list[str]) -> int:
    """Trains the run described by argv; see the module docstring."""
    from resnet_jax.train import loop

    # Before anything touches the devices: join the other processes, if any.
    loop.maybe_initialize_distributed()
    import jax

    if os.environ.get("RESNET_JAX_TEST_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["RESNET_JAX_TEST_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    from resnet_jax.config import apply_overrides, get_preset, validate

    cli = argv[0] == "--cli"
    workdir, overrides = argv[cli], argv[cli + 1:]
    preset = os.environ.get("RESNET_JAX_TEST_PRESET", "quick")
    config = apply_overrides(get_preset(preset), overrides)
    validate(config)
    install_hooks()
    if cli:
        from resnet_jax.cli import main as cli_main

        return cli_main(["train", "--workdir", workdir, "--config", preset,
                         *(f"--config.{o}" for o in overrides)])
    result = loop.train_and_evaluate(config, workdir, interactive=False)
    mark("done", result["step"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
