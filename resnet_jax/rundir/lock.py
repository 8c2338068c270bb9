"""One writer per run directory: an OS file lock held for the lifetime of the writing process.

`WorkdirLock` takes `fcntl.flock(LOCK_EX)` on `<dir>/.resnet_jax.lock` and writes who holds it
(pid, host, start time, command) into that file. The kernel releases the lock when the process
ends in any way (exit, exception, SIGKILL, OOM killer), so a killed run never leaves a stale lock
behind; the file itself stays and is reused. Readers that only look (report, evaluate) take no
lock; `holder()` tells them whether a writer is at work.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".resnet_jax.lock"
log = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another live process holds the directory's lock; the message names it."""


def describe_holder(info: dict | None) -> str:
    """`pid P on HOST, started T (COMMAND)` for a lock file's record (see `holder()`)."""
    if not info:
        return "another process (it has not yet recorded who it is)"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')} "
            f"({info.get('command')})")


def _read_info(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 65536, 0)
        info = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class WorkdirLock:
    """The exclusive lock of one run (or grid) directory; `acquire()` raises if it is taken.

    `what` names the holder's job in the lock file ("train", "ablate"); `flag` is the option
    the user gave the directory with, for the error message.
    """

    def __init__(self, directory: str | Path, what: str = "train", flag: str = "--workdir"):
        self.directory = Path(directory).absolute()
        self.path = self.directory / LOCK_FILE
        self.what, self.flag = what, flag
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self, wait: float = 1.0) -> WorkdirLock:
        """Takes the lock, retrying for `wait` seconds; raises WorkdirLockedError naming the holder.

        The short retry lets a reader's momentary probe (`holder()`) pass. On a file system
        without lock support the run goes ahead unlocked, with a warning.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                info = _read_info(fd)
                os.close(fd)
                raise WorkdirLockedError(
                    f"{self.flag} {self.directory} is in use by another run: "
                    f"{describe_holder(info)}. Two runs writing one directory would corrupt "
                    f"each other's checkpoints and metrics; wait for it to end (or stop it), or "
                    f"use another {self.flag}.") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                log.warning("cannot lock %s (%s): a second run on it would not be detected.",
                            self.path, e.strerror)
                os.close(fd)
                return self
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "what": self.what,
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]).strip()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Releases the lock (closing the file releases it; the file stays for the next run)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # no stale holder record while the directory is free
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(directory: str | Path) -> dict | None:
    """Who holds `directory`'s lock ({"pid", "host", "started", "command"}), or None if free.

    Only looks: it never creates the lock file, and holds a shared lock for an instant only.
    """
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd) or {}
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
