"""Stopping a run cleanly on SIGTERM (preemption) or SIGINT (Ctrl-C).

Inside `StopSignals` the first SIGTERM or SIGINT only sets `received`; the training loop then
saves a checkpoint at the end of the current step and stops. A second Ctrl-C aborts at once: the
first one already put SIGINT back to the default action, so the kernel ends the process without
waiting for Python (the newest complete checkpoint survives, as after any kill).
"""

from __future__ import annotations

import signal

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report


class StopSignals:
    """Context manager recording the first SIGTERM/SIGINT in `received` (a signal number)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles signals itself
                break
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C kills outright

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python; the default is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
