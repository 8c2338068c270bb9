"""The decoded-images cache of class-folder datasets: one .npz per source and split.

Decoding 60,000 JPEGs takes a while; the result is kept as uncompressed uint8 arrays under the
cache directory, one file per (source path, split), so reading it back takes well under a second.
Each file records the source's fingerprint (`ImageTree.fingerprint`); a changed source no longer
matches and is decoded again, replacing the stale file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from resnet_jax.data.folders import DecodedSplit

log = logging.getLogger(__name__)
# Bump when decoding changes what pixels a file gives, so old caches are not reused.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/resnet_jax/decoded`, else `~/.cache/resnet_jax/decoded`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "resnet_jax" / "decoded"


def cache_file(cache_dir: str | os.PathLike | None, source: Path, split: str) -> Path:
    """Where the decoded `split` of `source` is kept (keyed by the source's absolute path)."""
    where = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = hashlib.sha256(str(source.absolute()).encode()).hexdigest()[:16]
    return where / f"{source.name}-{key}-{split}.npz"


def _key(fingerprint: str) -> str:
    return f"v{CACHE_VERSION}:{fingerprint}"


def read_cached(path: Path, fingerprint: str) -> DecodedSplit | None:
    """The cached split if `path` exists and was made from a source with `fingerprint`."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != _key(fingerprint):
                return None
            return DecodedSplit(
                split=str(z["split"]),
                classes=tuple(str(c) for c in z["classes"]),
                files=tuple(str(f) for f in z["files"]),
                images=z["images"],
                labels=z["labels"].astype(np.int32),
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        # A damaged cache is only a lost shortcut: decode again and overwrite it.
        log.warning("Ignoring unreadable cache file %s (%s); decoding again.", path, e)
        return None


def write_cached(path: Path, fingerprint: str, decoded: DecodedSplit) -> None:
    """Writes `decoded` atomically (a kill leaves the old file or none, never half a file).

    A cache that cannot be written (read-only or full disk) only costs the next run a decode,
    so it is a warning, not an error.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.asarray(_key(fingerprint)),
                     split=np.asarray(decoded.split), classes=np.asarray(decoded.classes, str),
                     files=np.asarray(decoded.files, str), images=decoded.images,
                     labels=decoded.labels)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("Could not write the decoded-images cache %s (%s); the next run decodes "
                    "again. Set config.data.cache_dir to a writable folder.", path, e)
