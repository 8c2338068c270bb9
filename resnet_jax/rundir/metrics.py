"""`metrics.jsonl`: the one reader and the one writer of a run's logged records.

One JSON object per line: `{"step": int, "split": "train" | "validation" | "test", name: value,
...}`. A run killed at any moment may leave its last line cut short, and a resumed run repeats
the steps between its checkpoint and the kill. So:
- the writer, when a run starts or resumes at step S, first rewrites the file (atomically)
  without the records past S and without damaged lines, so the file holds one record per
  (split, step) as an uninterrupted run's would;
- every reader (`read_metrics`, `metrics_by_split`, `find_record`) keeps, per (split, step), the
  last complete record and skips a line cut short, so files written by older versions read the
  same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from resnet_jax.rundir.files import WriteError, atomic_write_text, describe_failure

METRICS_FILE = "metrics.jsonl"


def _valid(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("split"), str)
            and isinstance(record.get("step"), int) and not isinstance(record.get("step"), bool))


def _parse(path: Path, data: bytes | None = None) -> tuple[dict[tuple[str, int], dict], bool]:
    """{(split, step): last record} in first-seen order, and whether any line was damaged."""
    records: dict[tuple[str, int], dict] = {}
    damaged = False
    for line in (path.read_bytes() if data is None else data).split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # also UnicodeDecodeError: bytes that are not text at all
            record = None
        if not _valid(record):
            damaged = True
            continue
        records[(record["split"], record["step"])] = record
    if damaged and not records:
        raise ValueError(f"{path} holds no metrics record: its first line is not a JSON object "
                         "with 'step' and 'split' (not a metrics file written by resnet-jax?).")
    return records, damaged


def _ordered(records: dict[tuple[str, int], dict]) -> list[dict]:
    # By step; records of one step keep the order they were logged in (train, validation, test).
    return sorted(records.values(), key=lambda r: r["step"])


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's records, one per (split, step) (the last one logged), ordered by step.

    A missing file gives []; a file with no readable record at all raises ValueError naming it.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return _ordered(_parse(path)[0])


def metrics_by_split(run_dir: str | Path) -> dict[str, dict[int, dict]]:
    """The run's records as {split: {step: record}} (see `read_metrics`)."""
    out: dict[str, dict[int, dict]] = {}
    for r in read_metrics(run_dir):
        out.setdefault(r["split"], {})[r["step"]] = r
    return out


def find_record(run_dir: str | Path, step: int, split: str) -> dict | None:
    """The record logged for `split` at `step`, or None."""
    return metrics_by_split(run_dir).get(split, {}).get(step)


def wall_time(train_records: list[dict], batch_size: int) -> tuple[float | None, bool]:
    """(seconds, estimated): the run's time up to the last of its (step-ordered) train records.

    Its `wall_time_s` where every record has one. Records logged before that field existed give
    an estimate from the last such record's throughput (steps x batch / images_per_second, exact
    for a run never resumed), which later `wall_time_s` values were counted on from.
    """
    if not train_records:
        return None, False
    last = train_records[-1]
    estimated = any(not isinstance(r.get("wall_time_s"), (int, float)) for r in train_records)
    if isinstance(last.get("wall_time_s"), (int, float)):
        return float(last["wall_time_s"]), estimated
    ips = last.get("images_per_second")
    if isinstance(ips, (int, float)) and ips > 0 and batch_size > 0:
        return last["step"] * batch_size / ips, True
    return None, True


class MetricsWriter:
    """Appends records to `run_dir/metrics.jsonl` after trimming it to `resume_step`.

    Records past `resume_step` were logged by an earlier attempt that did not reach its next
    checkpoint; the resumed run logs those steps again, so they are dropped first. Raises
    WriteError naming the file when it cannot be written (e.g. the disk is full).
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0, batch_size: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        # Training seconds the run had spent up to `resume_step` (see `wall_time`), so that a
        # resumed run's clock goes on from there.
        self.wall_time_before = 0.0
        if self.path.is_file():
            self._trim(resume_step, batch_size)
        try:
            self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise WriteError(f"Could not write {self.path}: {describe_failure(e)}.") from e

    def _trim(self, resume_step: int, batch_size: int) -> None:
        data = self.path.read_bytes()
        try:
            records = _parse(self.path, data)[0]
        except ValueError:
            records = {}  # nothing readable: start the file afresh
        kept = [r for r in records.values() if r["step"] <= resume_step]
        train = sorted((r for r in kept if r["split"] == "train"), key=lambda r: r["step"])
        self.wall_time_before = wall_time(train, batch_size)[0] or 0.0
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text.encode() != data:  # something was dropped, repeated, damaged or cut short
            atomic_write_text(self.path, text)

    def write(self, record: dict) -> None:
        """Appends one record (a dict with "step" and "split") and flushes it to the OS."""
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise WriteError(f"Could not write {self.path}: {describe_failure(e)}.") from e

    def close(self) -> None:
        """Closes the file; a failing final flush raises WriteError."""
        try:
            self._file.close()
        except OSError as e:
            raise WriteError(f"Could not write {self.path}: {describe_failure(e)}.") from e
