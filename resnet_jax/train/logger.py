"""Side effects of a run's metrics: JSONL file, TensorBoard events, progress on the terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax

from resnet_jax.rundir.files import WriteError, describe_failure
from resnet_jax.rundir.metrics import MetricsWriter, read_metrics

__all__ = ["MetricsLogger", "TensorBoardEvents", "read_metrics"]


class TensorBoardEvents:
    """Scalars to a TensorBoard event file, written and flushed in the caller's thread.

    tensorboardX's `SummaryWriter` writes from a background thread and closes from an exit
    handler, so a full disk there printed tracebacks from both and then blocked on its full
    queue. Here a failed write raises WriteError naming the file, in the training loop.
    `purge_step` hides events that an earlier attempt logged past the resumed checkpoint.
    """

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        try:
            logdir.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(logdir / "events"))
        except OSError as e:
            raise WriteError(f"Could not write TensorBoard events in {logdir}: "
                             f"{describe_failure(e)}.") from e
        self.path = Path(self._writer._file_name)
        if purge_step is not None:
            self._guard(self._writer.write_event,
                        Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
            self.flush()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise WriteError(f"Could not write {self.path}: {describe_failure(e)}.") from e

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes one event per value (tag: name) at `step`, then flushes."""
        from tensorboardX.proto.summary_pb2 import Summary

        # The proto directly: tensorboardX's scalar() logs a warning for every NaN, and a
        # diverging run's NaNs are already in the log lines and metrics.jsonl.
        now = time.time()
        for tag, v in values.items():
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v))])
            self._guard(self._writer.write_event,
                        self._event(wall_time=now, step=step, summary=summary))
        self.flush()

    def flush(self) -> None:
        """Pushes written events to disk (fsync)."""
        self._guard(self._writer.flush)

    def close(self) -> None:
        """Flushes and closes the event file."""
        self._guard(self._writer.close)


def _compact(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


class MetricsLogger:
    """Writes each record to `metrics.jsonl` and TensorBoard, and shows progress (process 0 only).

    On an interactive terminal a `rich` progress bar shows step, bar, loss, images/s and ETA
    (fits 80 columns; the full records go to the log lines and `metrics.jsonl`); otherwise (CI, a
    log file) it prints one plain line per logged record. A resumed run first drops what an
    earlier attempt logged past `start_step` (see `resnet_jax.rundir.metrics`).
    """

    def __init__(self, workdir: Path, total_steps: int, start_step: int, batch_size: int,
                 interactive: bool | None = None, label: str = ""):
        self.active = jax.process_index() == 0
        # Printed before each line: which run speaks when several share a terminal (packed seeds).
        self.prefix = f"[{label}] " if label else ""
        self.total, self.batch_size = total_steps, batch_size
        self.start_step, self.start_time = start_step, time.time()
        self.progress, self.wall_time_before = None, 0.0
        if not self.active:
            return
        self.jsonl = MetricsWriter(workdir, start_step, batch_size)
        self.wall_time_before = self.jsonl.wall_time_before
        self.tb = TensorBoardEvents(workdir / "tensorboard",
                                    purge_step=start_step + 1 if start_step else None)
        interactive = sys.stdout.isatty() if interactive is None else interactive
        if interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            # The bar takes what the fixed-width columns leave, so all of them fit 80 columns.
            self.progress = Progress(
                TextColumn(self.prefix + "step {task.completed}/{task.total}"),
                BarColumn(bar_width=None),
                TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                TextColumn("ETA"), TimeRemainingColumn(), expand=True)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               loss="loss -", speed="- img/s")
            self.progress.start()

    def timing(self, step: int) -> dict[str, float]:
        """A train record's clock at `step`: `images_per_second`, the throughput since this
        process started (compile and evaluation included), and `wall_time_s`, the seconds the
        run has spent to get here, summed over the attempts that a resume continued."""
        elapsed = max(time.time() - self.start_time, 1e-9)
        return {"images_per_second": (step - self.start_step) * self.batch_size / elapsed,
                "wall_time_s": self.wall_time_before + elapsed}

    def write(self, step: int, split: str, metrics: dict) -> None:
        """Records `metrics` of `split` ("train", "validation", "test") at `step`.

        Raises WriteError naming the file if metrics.jsonl or the event file cannot be written.
        """
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write({"step": step, "split": split, **values})
        self.tb.scalars(step, {f"{split}/{k}": v for k, v in values.items()})
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if self.progress is not None:
            if split == "train":
                self.progress.update(
                    self.task, completed=step, loss=f"loss {_compact(values.get('loss', 0.0))}",
                    speed=f"{_compact(values.get('images_per_second', 0.0))} img/s")
            self.progress.console.print(f"{self.prefix}step {step} {split}: {text}")
        else:
            print(f"{self.prefix}step {step}/{self.total} {split}: {text}", flush=True)

    def message(self, text: str) -> None:
        """A line for the user, above the progress bar if there is one."""
        if not self.active:
            return
        if self.progress is not None:
            self.progress.console.print(self.prefix + text)
        else:
            print(self.prefix + text, flush=True)

    def close(self, raise_errors: bool = True) -> None:
        """Flushes and closes every sink.

        With `raise_errors=False` (another error is on its way to the user) a failing flush is
        dropped: a full disk is what that error already reports.
        """
        if not self.active:
            return
        self.active = False  # closed once; later writes and a second close do nothing
        if self.progress is not None:
            self.progress.stop()
        failed = None
        for sink in (self.jsonl, self.tb):
            try:
                sink.close()
            except WriteError as e:
                failed = failed or e
        if failed is not None and raise_errors:
            raise failed
