"""Faults: SIGKILL at any moment, a second run on one workdir, Ctrl-C, corrupted checkpoints,
no usable checkpoint, divergence, a full or vanished disk.

The kill test runs training in subprocesses (`helpers_train_proc.py`) on 2 simulated devices
with async checkpoints; the others reuse the session's finished `tiny_run` (checkpoints 10, 20)
or repeat it exactly (`TINY`: its config as overrides) to compare bit for bit.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import PREEMPTED_RUN, tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.backends.xla_flags import CONV_FLAG
from resnet_jax.cli import main
from resnet_jax.data import NormStats
from resnet_jax.train import (
    Checkpointer,
    CheckpointError,
    DivergenceError,
    abstract_state,
    make_mesh,
    make_optimizer,
    restore_run,
    train_and_evaluate,
)
from resnet_jax.train.checkpoint import MANIFEST, verify_manifest

HELPER = Path(__file__).with_name("helpers_train_proc.py")
ROOT = HELPER.parent.parent
# The killed run and its uninterrupted reference: same device count, so results are bitwise equal.
KILL_DEVICES = 2
KILL_RUN = [
    "train.batch_size=32", "train.num_steps=20", "train.log_every=2", "train.eval_every=20",
    "train.checkpoint_every=4", "train.steps_per_call=1", "train.async_checkpoints=True",
    "train.eval_batch_size=200", "train.eval_splits=()", "optim.warmup_steps=0",
]
# tiny_config(steps_per_call=5), i.e. the session's tiny_run, as overrides of the quick preset.
TINY = [
    "train.batch_size=64", "train.num_steps=20", "train.log_every=5", "train.eval_every=10",
    "train.checkpoint_every=10", "train.eval_batch_size=200", "train.async_checkpoints=False",
    "optim.warmup_steps=0", "train.steps_per_call=5",
]
TINY_CLI = ["--config", "quick", *(f"--config.{o}" for o in TINY)]


# ---------------------------------------------------------------------------------------------
# Subprocess plumbing


class TrainProcess:
    """A helper training process whose `MARK` lines can be awaited."""

    def __init__(self, workdir: Path, overrides: list[str], env: dict[str, str],
                 cli: bool = False, stderr: Path | None = None):
        """`cli`: train through `resnet-jax train`; `stderr`: a file for it (else with stdout)."""
        self._stderr = open(stderr, "w") if stderr else subprocess.STDOUT  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), *(["--cli"] if cli else []), str(workdir), *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float = 240) -> str:
        """Blocks until a line starting with `prefix` appears; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                pytest.fail(f"timed out waiting for {prefix!r}:\n" + "\n".join(self.lines[-30:]))
            if line is None:
                self.proc.wait()
                pytest.fail(f"process ended (rc {self.proc.returncode}) before {prefix!r}:\n"
                            + "\n".join(self.lines[-30:]))
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, no flush."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def marks(self, event: str) -> list[int]:
        return [int(x.split()[2]) for x in self.lines if x.startswith(f"MARK {event} ")
                and x.split()[2].isdigit()]


def subprocess_env(cache: Path, devices: int, **extra: str) -> dict[str, str]:
    """The environment of a helper process: `devices` simulated CPU devices, a compile cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {CONV_FLAG}"
    env["JAX_PLATFORMS"] = "cpu"
    env["RESNET_JAX_TEST_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Steps whose directory Orbax has committed (renamed from its temporary name)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def tmp_dirs(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if "tmp" in p.name) if ckpt_dir.is_dir() \
        else []


def logged(workdir: Path) -> list[tuple[str, int, dict]]:
    """Every line of metrics.jsonl as (split, step, values without the wall-clock figures)."""
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r.pop("split"), r.pop("step"), {k: v for k, v in r.items()
                                             if k not in ("images_per_second", "wall_time_s")})
            for r in records]


def assert_trees_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert len(la) > 10
    for x, y in zip(la, lb, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# 1. Crash safety


def test_sigkill_at_five_points_resumes_bitwise_exact(tmp_path):
    """Kills a run 5 times (async save in flight, commit pending, between steps, in a step, during
    restore); each restart resumes from the newest complete checkpoint, and the final state is
    bitwise equal to an uninterrupted run's."""
    cache = tmp_path / "xla_cache"
    env = subprocess_env(cache, KILL_DEVICES)
    # The uninterrupted reference runs alongside the killed one (two processes share the CPUs).
    ref = TrainProcess(tmp_path / "reference", KILL_RUN, env)

    workdir = tmp_path / "killed"
    ckpts = workdir / "checkpoints"
    history = []  # (where, newest complete step when it was killed)

    def restart(**extra: str) -> TrainProcess:
        return TrainProcess(workdir, KILL_RUN, subprocess_env(cache, KILL_DEVICES, **extra))

    def resumes_from_last_complete(p: TrainProcess) -> None:
        start = int(p.wait_for("MARK start").split()[2])
        assert start == (history[-1][1] or 0 if history else 0), (history, p.lines[-20:])

    def killed(p: TrainProcess, where: str) -> None:
        p.kill()
        history.append((where, max(committed_steps(ckpts), default=None)))

    # (1) During an async write: the save of step 4 has just started in the background.
    p = restart()
    resumes_from_last_complete(p)
    p.wait_for("MARK saving 4")
    killed(p, "async write of step 4")

    # (2) During the commit: step 8's files are written, Orbax has not renamed its directory.
    p = restart(RESNET_JAX_TEST_FINALIZE_DELAY="8:60")
    resumes_from_last_complete(p)
    p.wait_for("MARK finalizing 8")
    pending = tmp_dirs(ckpts)
    killed(p, "commit of step 8")
    assert any(name.startswith("8.") for name in pending), pending
    assert history[-1][1] == 4  # the half-saved step 8 is not listed: restart from 4

    # (3) Between steps: the process sleeps after logging step 10.
    p = restart(RESNET_JAX_TEST_LOG_PAUSE="10:60")
    resumes_from_last_complete(p)
    p.wait_for("MARK logged 10")
    killed(p, "between steps 10 and 11")

    # (4) During a step: steps 15-16 are being computed.
    p = restart()
    resumes_from_last_complete(p)
    assert not any(n.startswith("8.") for n in tmp_dirs(ckpts))  # leftovers removed on restart
    p.wait_for("MARK logged 14")
    time.sleep(0.05)
    killed(p, "inside step 15")
    assert history[-1][1] >= 8

    # (5) During the restore of the newest checkpoint (reading must not damage it).
    p = restart()
    line = p.wait_for("MARK restoring")
    assert int(line.split()[2]) == history[-1][1]
    killed(p, "during restore")

    p = restart()
    resumes_from_last_complete(p)
    p.wait_for("MARK done 20")
    assert p.proc.wait() == 0
    assert len(history) == 5
    assert committed_steps(ckpts)[-1] == 20 and not tmp_dirs(ckpts)
    assert (ckpts / "20" / MANIFEST).is_file() and verify_manifest(ckpts / "20") is None
    ref.wait_for("MARK done 20")
    assert ref.proc.wait() == 0

    reference = restore_run(tmp_path / "reference")[2]
    resumed = restore_run(workdir)[2]
    assert int(resumed.step) == int(reference.step) == 20
    assert_trees_equal(resumed, reference)


def test_sigterm_saves_a_checkpoint_and_exits_143(preempted_run):
    workdir, returncode, out, err = preempted_run
    assert returncode == 143, err[-3000:]
    step = int(re.search(r"Preempted at step (\d+); checkpoint saved\.", err).group(1))
    # One line on stderr and nothing else: no traceback, no second message on stdout.
    assert err == f"Preempted at step {step}; checkpoint saved. Rerun the same command to resume.\n"
    assert step >= 2 and "SIGTERM" not in out
    # The only checkpoint is the one SIGTERM made (the next scheduled one is at step 1000).
    ckpts = workdir / "checkpoints"
    assert committed_steps(ckpts) == [step] and verify_manifest(ckpts / str(step)) is None
    assert int(restore_run(workdir)[2].step) == step


def test_rerun_says_where_it_resumed(preempted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(preempted_run[0], run)
    step = committed_steps(run / "checkpoints")[-1]
    # The same command, with num_steps lowered to the saved step: it restores and stops.
    argv = ["train", "--workdir", str(run), "--config", "quick", *PREEMPTED_RUN,
            f"--config.train.num_steps={step}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"Resumed {run} from step {step}."
    assert f"Done: step={step}" in out


def test_second_run_is_refused_and_ctrl_c_saves_a_resumable_checkpoint(tiny_run, tmp_path,
                                                                        sample_dataset, capsys):
    """A training started on a workdir in use exits 2 within seconds naming the holder and
    touches nothing; Ctrl-C then saves the first run's step, prints one line and exits 130; the
    rerun ends bitwise equal to the uninterrupted tiny_run, with one record per (split, step)."""
    workdir = tmp_path / "run"
    go = {5: tmp_path / "go5", 15: tmp_path / "go15"}
    env = subprocess_env(Path(os.environ["JAX_COMPILATION_CACHE_DIR"]), 8,
                         RESNET_JAX_TEST_LOG_WAIT=",".join(f"{k}:{v}" for k, v in go.items()))
    first = TrainProcess(workdir, TINY, env, cli=True, stderr=tmp_path / "first.err")
    first.wait_for("MARK waiting 5")

    def snapshot() -> dict:
        return {str(p.relative_to(workdir)): p.read_bytes() if p.is_file() else None
                for p in sorted(workdir.rglob("*")) if p.name != ".resnet_jax.lock"}

    before = snapshot()
    start = time.monotonic()
    rc = main(["train", "--workdir", str(workdir), *TINY_CLI])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and elapsed < 15, (rc, elapsed)
    assert len(err) == 1 and err[0].startswith(f"error: --workdir {workdir} is in use by "
                                               f"another run: pid {first.proc.pid} on ")
    assert f"(helpers_train_proc.py --cli {workdir} " in err[0]  # the holder's command
    assert snapshot() == before  # the refused run wrote nothing, not even a metrics line

    go[5].touch()
    first.wait_for("MARK waiting 15")
    first.proc.send_signal(signal.SIGINT)
    go[15].touch()
    assert first.proc.wait(timeout=240) == 130
    first._stderr.close()
    assert (tmp_path / "first.err").read_text() == (
        "Interrupted (Ctrl-C) at step 15; checkpoint saved. Rerun the same command to resume.\n")
    assert committed_steps(workdir / "checkpoints") == [10, 15]

    result = train_and_evaluate(tiny_config(steps_per_call=5), workdir, dataset=sample_dataset,
                                interactive=False)
    assert result["test_error"] == tiny_run[1]["test_error"]
    assert_trees_equal(restore_run(workdir)[2], restore_run(tiny_run[0])[2])
    lines = logged(workdir)
    assert len({(split, step) for split, step, _ in lines}) == len(lines) == 8
    assert lines == logged(tiny_run[0])


def test_second_ctrl_c_aborts_at_once(tmp_path):
    """The first Ctrl-C asks for a save; a second one ends the process without waiting."""
    code = ("import os, signal, time\n"
            "from resnet_jax.train.signals import StopSignals\n"
            "with StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.2)\n"
            "    print('first', stop.received, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(60)\n"
            "print('still running', flush=True)\n")
    env = subprocess_env(tmp_path, 1)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["first", str(int(signal.SIGINT))]
    assert proc.returncode == -signal.SIGINT  # killed by the signal, as a shell shows with 130
    assert time.monotonic() - start < 50  # the 60 s sleep did not run out


# ---------------------------------------------------------------------------------------------
# 2. Corrupted and partial checkpoints


def _copy_run(tiny_run, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run[0], dst)
    return dst


def _target(sample_dataset):
    """An abstract, replicated train state of the tiny config (what a restore fills in)."""
    config = tiny_config()
    t = config.train
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    return abstract_state(config, sample_dataset.spec, tx, NamedSharding(make_mesh(), P()))


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_a_byte(path: Path) -> None:
    """Changes one byte in the middle of `path`; the size stays the same."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


DAMAGE = {
    "truncated array file": (lambda d: _truncate(_largest_file(d)), "truncated"),
    # What only the checksum sees: same size, same file names.
    "one byte changed": (lambda d: _flip_a_byte(_largest_file(d)),
                         "does not match its checksum"),
    "missing metadata": (lambda d: (d / "default" / "_METADATA").unlink(), "missing"),
    # Without our manifest (e.g. written by an older version), Orbax's own read must catch it.
    "truncated, no manifest": (
        lambda d: ((d / MANIFEST).unlink(), _truncate(_largest_file(d))), "cannot be read"),
}


# Orbax's abandoned shard reads of the damaged step must not print tracebacks after our warning.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_falls_back_with_a_warning(tiny_run, sample_dataset, tmp_path, caplog,
                                                      damage):
    run = _copy_run(tiny_run, tmp_path)
    ckpts = run / "checkpoints"
    target = _target(sample_dataset)
    good10 = Checkpointer(ckpts, read_only=True)
    expected = good10.restore(target, 10)
    good10.close()
    assert verify_manifest(ckpts / "20") is None
    breaker, words = DAMAGE[damage]
    breaker(ckpts / "20")

    ckpt = Checkpointer(ckpts)
    with caplog.at_level(logging.WARNING, logger="resnet_jax.train.checkpoint"):
        state = ckpt.restore(target)
    ckpt.close()
    assert int(state.step) == 10
    assert_trees_equal(state, expected)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"{ckpts / '20'} is unusable" in warning and words in warning
    if damage == "truncated, no manifest":
        # Unproven corruption stays in place until the run saves step 20 again.
        assert committed_steps(ckpts) == [10, 20]
        ckpt = Checkpointer(ckpts, async_save=False)
        ckpt.restore(target)
        ckpt.save(state.replace(step=state.step + 10))
        ckpt.close()
    # Moved aside, so the resumed run can write step 20 again; the evidence is kept.
    expected = [10, 20] if damage == "truncated, no manifest" else [10]
    assert committed_steps(ckpts) == expected
    assert len([p for p in (run / "checkpoints.corrupt").iterdir() if p.is_dir()]) == 1


def test_no_good_checkpoint_refuses_every_rerun_until_restart(tiny_run, tmp_path, capfd):
    run = _copy_run(tiny_run, tmp_path)
    for step in (10, 20):
        _truncate(_largest_file(run / "checkpoints" / str(step)))
    errors = []
    for _ in range(2):  # the rerun refuses the same way, though the checkpoints were moved aside
        assert main(["train", "--workdir", str(run), *TINY_CLI]) == 2
        errors.append(capfd.readouterr().err)
    assert errors[0] == errors[1]
    lines = errors[0].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No usable checkpoint in ")
    assert "checkpoints/20 is unusable" in lines[0] and "checkpoints/10 is unusable" in lines[0]
    assert "--restart" in lines[0]
    assert committed_steps(run / "checkpoints") == []
    old_metrics = (run / "metrics.jsonl").read_bytes()

    assert main(["train", "--workdir", str(run), "--restart", *TINY_CLI]) == 0
    assert "Traceback" not in capfd.readouterr().err
    archived = list((run / "archive").iterdir())
    assert len(archived) == 1 and (archived[0] / "metrics.jsonl").read_bytes() == old_metrics
    assert (archived[0] / "checkpoints.corrupt").is_dir()
    assert committed_steps(run / "checkpoints") == [10, 20]
    assert logged(run) == logged(tiny_run[0])  # from step 0 again, one record per step
    assert_trees_equal(restore_run(run)[2], restore_run(tiny_run[0])[2])


# ---------------------------------------------------------------------------------------------
# 3. Divergence


def test_divergence_stops_and_saves_only_the_last_good_parameters(tiny_run, sample_dataset,
                                                                  tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    ckpts = run / "checkpoints"
    target = _target(sample_dataset)
    reader = Checkpointer(ckpts, read_only=True)
    before = reader.restore(target, 20)
    reader.close()
    # NaN normalisation statistics: every step from 21 on has a non-finite loss.
    stats = sample_dataset.stats
    poisoned = dataclasses.replace(
        sample_dataset, stats=NormStats(stats.mean, np.full_like(stats.std, np.nan)))
    # A checkpoint at step 25, inside the bad streak (5 bad steps, below the limit of 8).
    config = tiny_config(num_steps=40, max_consecutive_nonfinite=8, checkpoint_every=5)
    with pytest.raises(DivergenceError) as info:
        train_and_evaluate(config, run, dataset=poisoned, interactive=False,
                           allow_config_change=True)
    msg = str(info.value)
    # Checked at the log step 30 (log_every=5): steps 21..30 were all bad and skipped.
    assert "diverged at step 21" in msg and "21..30" in msg
    assert f"last good checkpoint is step 25 in {ckpts}" in msg
    assert committed_steps(ckpts) == [10, 20, 25]
    reader = Checkpointer(ckpts, read_only=True)
    after = reader.restore(target, 25)
    reader.close()
    # Step 25 holds step 20's parameters, BN statistics and optimiser state: no bad step applied.
    assert int(after.step) == 25 and int(after.nonfinite_consecutive) == 5
    assert int(after.nonfinite_total) == int(before.nonfinite_total) + 5
    assert_trees_equal((after.params, after.batch_stats, after.opt_state, after.rng),
                       (before.params, before.batch_stats, before.opt_state, before.rng))


def test_checkpointer_refuses_non_finite_parameters(tiny_run, sample_dataset, tmp_path):
    ckpts = _copy_run(tiny_run, tmp_path) / "checkpoints"
    ckpt = Checkpointer(ckpts, async_save=False)
    state = ckpt.restore(_target(sample_dataset))
    bad = state.replace(step=state.step + 10,
                        params=jax.tree.map(lambda x: x * np.nan, state.params))
    with pytest.raises(CheckpointError, match="diverged: the parameters of step 30 are not finite"
                       r".*The last good checkpoint \(step 20\)"):
        ckpt.save(bad)
    ckpt.close()
    assert committed_steps(ckpts) == [10, 20]
    # Diverged before the first checkpoint (e.g. learning_rate=1e30): no "checkpoint (None)".
    fresh = Checkpointer(tmp_path / "fresh", async_save=False)
    with pytest.raises(CheckpointError) as info:
        fresh.save(bad)
    fresh.close()
    assert "No checkpoint was written before that" in str(info.value)
    assert "None" not in str(info.value) and committed_steps(tmp_path / "fresh") == []


# ---------------------------------------------------------------------------------------------
# 6. Disk full, directory gone


def test_disk_full_during_async_save_fails_loudly_and_keeps_previous(tiny_run, sample_dataset,
                                                                     tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path

    ckpts = _copy_run(tiny_run, tmp_path) / "checkpoints"
    target = _target(sample_dataset)
    ckpt = Checkpointer(ckpts, async_save=True)
    state = ckpt.restore(target)
    write_text = async_path.write_text

    async def full_disk(path, text, *args, **kwargs):
        # The commit marker is the last file Orbax writes before renaming the step directory.
        if "commit_success" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return await write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(async_path, "write_text", full_disk)
    ckpt.save(state.replace(step=state.step + 10))  # returns at once: the write is async
    with pytest.raises(CheckpointError) as info:
        ckpt.wait()
    monkeypatch.undo()
    ckpt.close()
    msg = str(info.value)
    assert "step 30" in msg and "disk is full" in msg and "(step 20) is kept" in msg
    assert committed_steps(ckpts) == [10, 20]
    reader = Checkpointer(ckpts, read_only=True)
    restored = reader.restore(target)
    reader.close()
    assert int(restored.step) == 20
    assert_trees_equal(restored, state)


def test_vanished_checkpoint_directory_fails_loudly(tiny_run, sample_dataset, tmp_path):
    ckpts = _copy_run(tiny_run, tmp_path) / "checkpoints"
    target = _target(sample_dataset)
    ckpt = Checkpointer(ckpts)
    state = ckpt.restore(target)
    moved = tmp_path / "unmounted"
    ckpts.rename(moved)  # the disk goes away mid-run
    with pytest.raises(CheckpointError, match=f"{ckpts} has disappeared"):
        ckpt.save(state.replace(step=state.step + 10))
    ckpt.close()
    assert not ckpts.exists()  # not silently recreated (with none of the earlier steps)
    moved.rename(ckpts)
    reader = Checkpointer(ckpts, read_only=True)
    assert int(reader.restore(target).step) == 20
    reader.close()


def _full_disk_error() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_checkpoint_commit(monkeypatch) -> None:
    from orbax.checkpoint._src.path import async_path

    write_text = async_path.write_text

    async def full_disk(path, text, *args, **kwargs):
        if "commit_success" in str(path) and "/30." in str(path):
            raise _full_disk_error()
        return await write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(async_path, "write_text", full_disk)


def _fill_metrics_at_step_25(monkeypatch) -> None:
    import builtins

    import resnet_jax.rundir.metrics as metrics

    class FillingFile:
        def __init__(self, *args, **kwargs):
            self._file = builtins.open(*args, **kwargs)

        def write(self, text):
            if '"step": 25,' in text:
                self._file.write(text[:9])  # a partial line, as a full disk leaves it
                raise _full_disk_error()
            return self._file.write(text)

        def __getattr__(self, name):
            return getattr(self._file, name)

    monkeypatch.setattr(metrics, "open", FillingFile, raising=False)


def _fill_tensorboard_at_third_flush(monkeypatch) -> None:
    from tensorboardX.record_writer import RecordWriter

    flush, calls = RecordWriter.flush, []

    def full_disk(self):
        calls.append(1)
        if len(calls) >= 3:  # the resume's purge marker and step 25's records went through
            raise _full_disk_error()
        return flush(self)

    monkeypatch.setattr(RecordWriter, "flush", full_disk)


DISK_FULL = {
    "checkpoint": (_fill_checkpoint_commit, "the checkpoint of step 30 to {run}/checkpoints: the "
                   "disk is full", "The previous checkpoint (step 20) is kept"),
    "metrics": (_fill_metrics_at_step_25, "{run}/metrics.jsonl: the disk is full.",
                "The last complete checkpoint (step 20) is kept"),
    "tensorboard": (_fill_tensorboard_at_third_flush, "{run}/tensorboard/events.out.tfevents.",
                    "The last complete checkpoint (step 20) is kept"),
}


@pytest.mark.parametrize("where", list(DISK_FULL))
def test_disk_full_prints_only_the_documented_paragraph(tiny_run, tmp_path, capfd, caplog,
                                                        monkeypatch, where):
    """A full disk while saving a checkpoint, writing metrics.jsonl or flushing TensorBoard:
    exit 2 and one `error:` line naming the file and the checkpoint to resume from, and nothing
    else on stderr (no tracebacks from Orbax's, TensorStore's or TensorBoard's threads, no
    library error logs: pytest captures logging apart from stderr, so they are checked too)."""
    run = _copy_run(tiny_run, tmp_path)
    fill, what, kept = DISK_FULL[where]
    fill(monkeypatch)
    rc = main(["train", "--workdir", str(run), *TINY_CLI, "--config.train.num_steps=30",
               "--config.train.async_checkpoints=True"])
    monkeypatch.undo()
    err = capfd.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: Could not write {what.format(run=run)}") and kept in err, err
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert committed_steps(run / "checkpoints") == [10, 20]
