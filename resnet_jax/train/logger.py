"""Side effects of a run's metrics: JSONL file, TensorBoard events, progress on the terminal."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax


class MetricsLogger:
    """Writes each record to `metrics.jsonl` and TensorBoard, and shows progress (process 0 only).

    On an interactive terminal a `rich` progress bar shows step, loss, images/s and ETA; otherwise
    (CI, a log file) it prints one plain line per logged record.
    """

    def __init__(self, workdir: Path, total_steps: int, start_step: int, batch_size: int,
                 interactive: bool | None = None, label: str = ""):
        self.active = jax.process_index() == 0
        # Printed before each line: which run speaks when several share a terminal (packed seeds).
        self.prefix = f"[{label}] " if label else ""
        self.total, self.batch_size = total_steps, batch_size
        self.start_step, self.start_time = start_step, time.time()
        self.progress = None
        if not self.active:
            return
        self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tensorboard"))
        interactive = sys.stdout.isatty() if interactive is None else interactive
        if interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               info="")
            self.progress.start()

    def images_per_second(self, step: int) -> float:
        """Training throughput since this process started (compile time included)."""
        elapsed = max(time.time() - self.start_time, 1e-9)
        return (step - self.start_step) * self.batch_size / elapsed

    def write(self, step: int, split: str, metrics: dict) -> None:
        """Records `metrics` of `split` ("train", "validation", "test") at `step`."""
        if not self.active:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", float(v), step)
        text = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
        if self.progress is not None:
            if split == "train":
                self.progress.update(self.task, completed=step, info=text)
            else:
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

    def close(self) -> None:
        """Flushes and closes every sink."""
        if not self.active:
            return
        if self.progress is not None:
            self.progress.stop()
        self.jsonl.close()
        self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
