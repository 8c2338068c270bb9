"""Atomic file writes that name the file when they fail, and leave nothing behind.

Every file a command writes (a run's config.json, evaluate's summary, the report, an exported
model) goes through `atomic_write`: the content is written to a uniquely named temporary file in
the same folder, flushed to disk, then renamed over the target. A kill at any moment leaves
either the old file or the new one, never half of it; a failure (disk full, permission denied,
a directory in the way) removes the temporary file and raises `WriteError` naming the target.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

# What a failed write means to the user, by errno.
_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOENT: "its folder does not exist",
    errno.ENOTDIR: "a part of its path is a file, not a folder",
    errno.EISDIR: "it is a directory",
}


class WriteError(OSError):
    """A file could not be written; the message names it and says why."""


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (an OSError, or a library error that wraps one in its text) means ENOSPC."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # TensorStore and Orbax report a full disk as a ValueError carrying the OS message.
    text = str(e)
    return "No space left on device" in text or "os_error_code='28'" in text


def describe_failure(e: BaseException) -> str:
    """Why a write failed, in a few words ("the disk is full", "permission denied", ...)."""
    if is_disk_full(e):
        return "the disk is full"
    if isinstance(e, OSError) and e.errno in _REASONS:
        return _REASONS[e.errno]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(tmp)` to produce the file, then renames it to `path`; returns `path`.

    Raises WriteError naming `path` if the folder cannot be made, `path` is a directory, or the
    write fails; the temporary file is removed in every case.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"Could not write {path}: it is a directory; give a file name inside "
                         "it instead.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir()
               else describe_failure(e))
        raise WriteError(f"Could not write {path}: cannot create its folder {path.parent} "
                         f"({why}).") from e
    tmp = None
    try:
        # Unique per writer: two processes writing the same target never share a temp file.
        # Created with open(..., "x") rather than mkstemp so it gets the umask's permissions.
        candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        candidate.open("x").close()
        tmp = candidate
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
        tmp = None
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 - any writer failure (OSError, SafetensorError, ...)
        raise WriteError(f"Could not write {path}: {describe_failure(e)}.") from e
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the original error is what the user needs to see
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data, indent: int | None = 2) -> Path:
    """Writes `data` as JSON to `path` atomically (see `atomic_write`)."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: str | Path, what: str = "file"):
    """The JSON content of `path`; ValueError naming the file if it is empty or not JSON.

    A file cut short (an older version killed while writing it) is reported as such, not as
    "Expecting value: line 1 column 1".
    """
    path = Path(path)
    text = path.read_bytes()
    if not text.strip():
        raise ValueError(f"{path} is empty (the {what} was probably being written when the "
                         "process was killed).")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid JSON {what} ({e}); it may be cut short or "
                         "damaged.") from None
