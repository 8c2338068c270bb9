"""The run directory's files: the workdir lock, the one metrics reader/writer, atomic writes.

No training here: each test writes the few files it needs (the lock test starts a small Python
process that only takes the lock).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_jax.rundir.archive import archive_run
from resnet_jax.rundir.files import WriteError, atomic_write_text, read_json
from resnet_jax.rundir.lock import LOCK_FILE, WorkdirLock, WorkdirLockedError, holder
from resnet_jax.rundir.metrics import (
    METRICS_FILE,
    MetricsWriter,
    find_record,
    metrics_by_split,
    read_metrics,
    wall_time,
)

ROOT = Path(__file__).resolve().parent.parent


def _rec(step: int, split: str = "train", **values) -> str:
    return json.dumps({"step": step, "split": split, "loss": float(step), **values}) + "\n"


# --- the workdir lock ------------------------------------------------------------------------


def test_lock_names_its_holder_and_dies_with_it(tmp_path, capsys):
    """A second locker fails naming pid and host; SIGKILL of the holder frees the directory."""
    code = ("import sys, time; from resnet_jax.rundir.lock import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        info = holder(tmp_path)
        assert info is not None and info["pid"] == proc.pid
        start = time.monotonic()
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(tmp_path).acquire(wait=0.2)
        assert time.monotonic() - start < 5
        msg = str(e.value)
        assert f"--workdir {tmp_path} is in use by another run: pid {proc.pid} on " in msg
        assert info["host"] in msg and info["started"] in msg
        # `evaluate` reads a run being trained, and says so.
        from resnet_jax.inference.cli import _note_live_run

        _note_live_run(str(tmp_path))
        assert capsys.readouterr().err.startswith(
            f"note: {tmp_path} is being trained now (pid {proc.pid} on ")
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        proc.wait()
    assert holder(tmp_path) is None
    with WorkdirLock(tmp_path) as lock:
        assert lock.held and holder(tmp_path)["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no stale holder record


def test_lock_in_one_process_excludes_a_second_lock_object(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire(wait=0)
    WorkdirLock(tmp_path).acquire(wait=0).release()


# --- metrics.jsonl ---------------------------------------------------------------------------


def test_reader_keeps_the_last_record_per_split_and_step_and_skips_a_cut_line(tmp_path):
    # An attempt logged 5 and 10, was killed mid-line at 15; the resume (from 5) logged 10, 15
    # again (an older version appended without trimming).
    text = (_rec(5) + _rec(10, loss_note=1.0) + _rec(10, "test") + '{"step": 15, "spl'
            + "\n" + _rec(10) + _rec(15) + '{"step": 20, "split": "tr')
    (tmp_path / METRICS_FILE).write_text(text)
    records = read_metrics(tmp_path)
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 5), ("train", 10), ("test", 10), ("train", 15)]
    assert "loss_note" not in records[1]  # the resumed run's record replaced the first one
    assert find_record(tmp_path, 10, "test")["loss"] == 10.0
    assert find_record(tmp_path, 20, "train") is None
    assert sorted(metrics_by_split(tmp_path)["train"]) == [5, 10, 15]
    assert read_metrics(tmp_path / "missing") == []


def test_reader_names_a_file_that_is_not_metrics(tmp_path):
    (tmp_path / METRICS_FILE).write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff garbage")
    with pytest.raises(ValueError, match=f"{tmp_path / METRICS_FILE} holds no metrics record"):
        read_metrics(tmp_path)


def test_writer_trims_what_a_resumed_run_logs_again(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(_rec(5) + _rec(10) + _rec(10, "test") + _rec(15) + '{"step": 2')
    writer = MetricsWriter(tmp_path, resume_step=10)
    # On disk right away: a kill before the first new record leaves no stale lines.
    assert path.read_text() == _rec(5) + _rec(10) + _rec(10, "test")
    writer.write({"step": 15, "split": "train", "loss": 1.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path) if r["split"] == "train"] == [
        (5, 5.0), (10, 10.0), (15, 1.5)]
    MetricsWriter(tmp_path, resume_step=0).close()  # a run starting over from step 0
    assert path.read_text() == ""


def test_a_resumed_runs_clock_goes_on_from_its_checkpoint(tmp_path):
    from resnet_jax.train.logger import MetricsLogger

    records = [{"step": 5, "split": "train", "wall_time_s": 50.0},
               {"step": 10, "split": "train", "wall_time_s": 100.0},
               {"step": 10, "split": "test", "error": 9.0},
               {"step": 15, "split": "train", "wall_time_s": 150.0}]  # lost: after the checkpoint
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    logger = MetricsLogger(tmp_path, 20, 10, 4, interactive=False)
    try:
        timing = logger.timing(12)
    finally:
        logger.close()
    # 100 s to step 10 from the kept record (not 0, not the dropped 150), plus this process's
    # seconds at most.
    assert 100.0 <= timing["wall_time_s"] < 140.0
    assert timing["images_per_second"] > 0
    # A run started afresh begins at zero.
    fresh = MetricsWriter(tmp_path, resume_step=0)
    fresh.close()
    assert fresh.wall_time_before == 0.0
    # Records from before wall_time_s: estimated from the throughput, 10 steps x 4 / 2 img/s.
    old = [{"step": 5, "split": "train", "images_per_second": 1.0},
           {"step": 10, "split": "train", "images_per_second": 2.0}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in old))
    resumed = MetricsWriter(tmp_path, resume_step=10, batch_size=4)
    resumed.write({"step": 15, "split": "train", "images_per_second": 3.0, "wall_time_s": 27.0})
    resumed.close()
    assert resumed.wall_time_before == 20.0
    assert wall_time(read_metrics(tmp_path), 4) == (27.0, True)  # partly estimated
    assert wall_time(read_metrics(tmp_path)[:2], 4) == (20.0, True)


def test_writer_reports_a_full_disk_naming_the_file(tmp_path, monkeypatch):
    import errno

    import resnet_jax.rundir.metrics as metrics

    class FullDisk:
        def __init__(self, *args, **kwargs):
            pass

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    monkeypatch.setattr(metrics, "open", FullDisk, raising=False)
    writer = MetricsWriter(tmp_path)
    with pytest.raises(WriteError, match=f"Could not write {tmp_path / METRICS_FILE}: the disk "
                       "is full"):
        writer.write({"step": 1, "split": "train"})


# --- atomic writes, JSON reads, archives -------------------------------------------------------


def test_atomic_write_leaves_old_content_or_nothing(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    from resnet_jax.rundir.files import atomic_write

    with pytest.raises(WriteError, match=f"Could not write {target}: the disk is full"):
        atomic_write(target, failing)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json"]
    with pytest.raises(WriteError, match="it is a directory"):
        atomic_write_text(tmp_path, "x")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(WriteError, match="cannot create its folder"):
        atomic_write_text(tmp_path / "a_file" / "out.json", "x")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("content, words", [("", "is empty"),
                                            ('{"model": {"dep', "is not a valid JSON")])
def test_read_json_names_a_cut_file(tmp_path, content, words):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} {words}"):
        read_json(tmp_path / "config.json", "run config")


def test_archive_moves_the_old_run_aside(tmp_path):
    for name in ("config.json", METRICS_FILE):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("the user's own file")
    dest = archive_run(tmp_path)
    assert dest.parent == tmp_path / "archive"
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoints", "config.json", METRICS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "notes.txt"]
    assert archive_run(tmp_path) is None
