"""Class-folder image datasets: list `train/<class>/*` and `test/<class>/*`, decode one image.

A dataset is a directory or a `.tar` / `.tar.gz` / `.tgz` holding `train/<class>/<file>` and a
held-out split `test/<class>/<file>` (or `val/<class>/<file>`), optionally under one top folder.
Images are JPEG or PNG files; hidden files are ignored and other files are skipped (listed in
`SplitListing.skipped`). This module only lists and decodes, so that the resident loader
(`folder_source.py`) and a streaming pipeline can share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TRAIN = "train"
HELD_OUT = "held_out"
# Folders accepted for the held-out split, in order of preference.
HELD_OUT_FOLDERS = ("test", "val")
SPLIT_FOLDERS = (TRAIN, *HELD_OUT_FOLDERS)
LAYOUT = "train/<class>/*.jpg|png and test/<class>/* (or val/<class>/*)"

# Pillow modes decoded to one channel; every other mode is decoded to RGB.
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Modes that carry an alpha channel; "P"/"L"/"RGB" images may also have a tRNS transparency.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class ImageDecodeError(ValueError):
    """An image file is corrupt or not a JPEG/PNG Pillow can read; the message names it."""


class FolderLayoutError(ValueError):
    """The directory or archive does not hold the class-folder layout; the message says why."""


@dataclasses.dataclass(frozen=True)
class SplitListing:
    """The image files of one split, sorted, with their class folder (an index into `classes`)."""

    split: str  # the folder's name: "train", "test" or "val"
    classes: tuple[str, ...]  # sorted class folder names
    files: tuple[str, ...]  # paths relative to the dataset root, e.g. "train/cat/0001.jpg"
    labels: np.ndarray  # int32 [len(files)], index into `classes`
    skipped: tuple[str, ...] = ()  # non-image files (and files outside a class folder)


@dataclasses.dataclass(frozen=True)
class DecodedSplit:
    """A decoded split: uint8 [N, H, W, C] images in `files` order, labels index `classes`."""

    split: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray


def is_tar_path(path: str | os.PathLike) -> bool:
    """True if `path` names a tar archive by its suffix (.tar, .tar.gz, .tgz)."""
    return str(path).lower().endswith(TAR_SUFFIXES)


def is_image_file(name: str) -> bool:
    """True if `name` has a JPEG or PNG suffix."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def build_listing(split: str, entries: Sequence[str],
                  class_dirs: Sequence[str] = ()) -> SplitListing:
    """The listing of one split from paths relative to the split folder ("cat/0001.jpg").

    `class_dirs` adds class folders that hold no files (a directory can have empty ones).
    """
    by_class: dict[str, list[str]] = {c: [] for c in class_dirs if not c.startswith(".")}
    skipped = []
    for rel in sorted(entries):
        parts = rel.split("/")
        if _hidden(parts):
            continue
        if len(parts) < 2 or not is_image_file(parts[-1]):
            skipped.append(f"{split}/{rel}")
            continue
        by_class.setdefault(parts[0], []).append(f"{split}/{rel}")
    classes = tuple(sorted(by_class))
    files = [f for c in classes for f in by_class[c]]
    labels = np.concatenate([np.full(len(by_class[c]), i, np.int32)
                             for i, c in enumerate(classes)] or [np.zeros(0, np.int32)])
    return SplitListing(split, classes, tuple(files), labels, tuple(skipped))


class ImageTree:
    """A class-folder dataset in a directory or a tar archive: its splits, files and bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise FileNotFoundError(
                f"{self.path}: no such directory or archive (expected a folder or a .tar/.tar.gz "
                f"holding {LAYOUT})"
            )
        self.is_tar = self.path.is_file()
        if self.is_tar and not is_tar_path(self.path):
            raise FolderLayoutError(
                f"{self.path} is a file but not a .tar, .tar.gz or .tgz archive; pass a folder or "
                f"an archive holding {LAYOUT}"
            )
        self._listings: dict[str, SplitListing] = {}
        # A tar's members, read on first use: image bytes, regular files and folders, named
        # relative to the dataset root, which is `_prefix` inside the archive.
        self._members: dict[str, bytes | tuple[int, int]] | None = None
        self._fd: int | None = None  # an uncompressed tar, opened for reads by offset
        self._files: list[str] = []
        self._dirs: list[str] = []
        self._prefix = ""
        # A directory's dataset root (the folder holding train/, test/, val/).
        self._root = self.path if self.is_tar else self._find_dir_root()

    # --- where the splits are ---------------------------------------------------------------
    def _find_dir_root(self) -> Path:
        # The root holds the split folders (train/ is only needed to train; scoring the test
        # split of a trained run needs test/ alone).
        def has_splits(d: Path) -> bool:
            return any((d / s).is_dir() for s in SPLIT_FOLDERS)

        if has_splits(self.path):
            return self.path
        inner = [d for d in sorted(self.path.iterdir())
                 if d.is_dir() and not d.name.startswith(".") and has_splits(d)]
        if len(inner) == 1:
            return inner[0]
        raise FolderLayoutError(self._no_train(sorted(p.name for p in self.path.iterdir())))

    def _no_train(self, found: list[str]) -> str:
        shown = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "")
        return (f"{self.path} has no train/ folder (found: {shown or 'nothing'}); expected "
                f"{LAYOUT}, directly or under one top folder")

    def _load_tar(self) -> dict[str, bytes | tuple[int, int]]:
        """Indexes the archive's image members once.

        An uncompressed .tar is indexed by (offset, size) and read on demand, so a dataset larger
        than memory can be streamed from it; a compressed one cannot seek, so its images are read
        into memory in this one pass.
        """
        if self._members is not None:
            return self._members
        raw: dict[str, bytes | tuple[int, int]] = {}
        names: list[tuple[str, bool]] = []  # (name, is a regular file)
        seekable = _is_plain_tar(self.path)
        try:
            with tarfile.open(self.path, "r:" if seekable else "r|*") as tar:
                for m in tar:
                    name = m.name.rstrip("/")
                    names.append((name, m.isfile()))
                    if m.isfile() and is_image_file(name):
                        raw[name] = ((m.offset_data, m.size) if seekable else
                                     tar.extractfile(m).read())  # type: ignore[union-attr]
        except _STREAM_ERRORS as e:
            raise FolderLayoutError(f"{self.path}: cannot read the archive (truncated or corrupt? "
                                    f"{type(e).__name__}: {e})") from e
        # The root is the shallowest folder holding split folders: "" or one top folder.
        split_depths = [[i for i, part in enumerate(n.split("/")) if part in SPLIT_FOLDERS]
                        for n, _ in names]
        if not any(split_depths):
            raise FolderLayoutError(self._no_train(sorted({n.split("/")[0] for n, _ in names})))
        depth = min(d[0] for d in split_depths if d)
        prefixes = {"/".join(n.split("/")[:depth])
                    for (n, _), d in zip(names, split_depths, strict=True) if depth in d}
        if len(prefixes) > 1:
            raise FolderLayoutError(f"{self.path} holds several datasets ({sorted(prefixes)}, "
                                    "each with split folders); archive one at a time")
        prefix = (next(iter(prefixes)) + "/") if depth else ""
        self._prefix = prefix
        inside = [(n.removeprefix(prefix), f) for n, f in names if n.startswith(prefix)]
        self._files = [n for n, f in inside if f]
        self._dirs = [n for n, f in inside if not f]
        self._members = {n.removeprefix(prefix): b for n, b in raw.items() if n.startswith(prefix)}
        return self._members

    def split_folder(self, split: str) -> str:
        """The folder of `split` (TRAIN or HELD_OUT): "train", "test" or "val"."""
        if split == TRAIN:
            if self.is_tar:
                self._load_tar()
                found = any(n.split("/")[0] == TRAIN for n in self._files + self._dirs)
            else:
                found = (self._root / TRAIN).is_dir()
            if not found:
                raise FolderLayoutError(self._no_train(self._top_names()))
            return TRAIN
        if split != HELD_OUT:
            raise ValueError(f"split {split!r} is not valid; choose {TRAIN!r} or {HELD_OUT!r}")
        if self.is_tar:
            self._load_tar()
            present = {n.split("/")[0] for n in self._files + self._dirs}
        else:
            present = {d for d in HELD_OUT_FOLDERS if (self._root / d).is_dir()}
        for name in HELD_OUT_FOLDERS:
            if name in present:
                return name
        raise FolderLayoutError(f"{self.path} has no held-out split: expected a test/ (or val/) "
                                "folder of class folders beside train/")

    def _top_names(self) -> list[str]:
        if self.is_tar:
            return sorted({n.split("/")[0] for n in self._files + self._dirs})
        return sorted(p.name for p in self._root.iterdir())

    # --- listing ----------------------------------------------------------------------------
    def list_split(self, split: str) -> SplitListing:
        """The class folders and image files of `split` (TRAIN or HELD_OUT)."""
        if split not in self._listings:
            self._listings[split] = self._list(self.split_folder(split))
        return self._listings[split]

    def _list(self, folder: str) -> SplitListing:
        if self.is_tar:
            self._load_tar()
            inner = folder + "/"
            entries = [n.removeprefix(inner) for n in self._files if n.startswith(inner)]
            class_dirs = [n.removeprefix(inner) for n in self._dirs
                          if n.startswith(inner) and "/" not in n.removeprefix(inner)]
            return build_listing(folder, entries, class_dirs)
        base = self._root / folder
        entries, class_dirs = [], []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            if rel_dir == ".":
                class_dirs = list(dirnames)
                entries += filenames
            else:
                entries += [f"{rel_dir}/{f}" for f in filenames]
        return build_listing(folder, entries, class_dirs)

    def fingerprint(self, split: str) -> str:
        """Changes whenever `split`'s data may have changed.

        An archive: its path, size and modification time. A directory: a hash of the split's
        listing with every file's size and modification time (a stat of each file, no reads).
        """
        if self.is_tar:
            st = self.path.stat()
            return f"tar:{self.path}:{st.st_size}:{st.st_mtime_ns}"
        listing = self.list_split(split)
        h = hashlib.sha256()
        h.update("\n".join(listing.classes).encode())
        for f in listing.files:
            st = (self._root / f).stat()
            h.update(f"\n{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return f"dir:{self._root}:{h.hexdigest()}"

    # --- reading ----------------------------------------------------------------------------
    def describe(self, file: str) -> str:
        """How an error names `file`: the archive path and member, or the file's path."""
        if self.is_tar:
            return f"{self.path}:{self._prefix}{file}"
        return str(self._root / file)

    def read(self, files: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        """`(name for errors, bytes)` of each file, in the given order."""
        for f in files:
            yield self.describe(f), self.read_one(f)

    def read_one(self, file: str) -> bytes:
        """The bytes of one file (a path from a listing); safe to call from several threads."""
        if self.is_tar:
            member = self._load_tar()[file]
            if isinstance(member, bytes):
                return member
            offset, size = member
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            data = os.pread(self._fd, size, offset)
            if len(data) != size:
                raise ImageDecodeError(f"{self.describe(file)}: the archive ends inside this "
                                       "file (truncated or changed since it was listed?)")
            return data
        path = self._root / file
        try:
            return path.read_bytes()
        except OSError as e:
            raise ImageDecodeError(f"{path}: cannot read ({e.strerror or e})") from None

    def __getstate__(self) -> dict:
        # A worker process opens its own descriptor.
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _is_plain_tar(path: Path) -> bool:
    """True for an uncompressed tar (members can be read by offset); False if compressed."""
    with open(path, "rb") as f:
        magic = f.read(6)
    return not magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))


def looks_like_image_tree(path: str | os.PathLike | None) -> bool:
    """A cheap guess (no reading) whether `path` is a class-folder dataset: an archive by its
    suffix, or a directory with train/ directly or under one top folder."""
    if not path:
        return False
    p = Path(path).expanduser()
    if p.is_file():
        return is_tar_path(p)
    if not p.is_dir():
        return False
    return (p / TRAIN).is_dir() or any((d / TRAIN).is_dir() for d in p.iterdir() if d.is_dir())


def flatten_alpha(img: Image.Image,
                  background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composites transparent pixels over `background` (RGB out); opaque images pass unchanged.

    Shared by the dataset decoder (white) and `resnet-jax predict` (its --background)."""
    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def narrow_wide_gray(img: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale mapped 0..65535 -> 0..255 ("L"); other images unchanged.

    Pillow's own convert("L") clips such images at 255 instead of rescaling them."""
    if img.mode not in _WIDE_GRAY_MODES:
        return img
    wide = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")


def as_gray_or_rgb(img: Image.Image,
                   background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A decoded image in mode "L" (grayscale modes) or "RGB" (all others), transparency
    composited over `background`, 16-bit grayscale scaled to 8 bits.

    How the datasets decode a file (`open_image`), shared with `resnet-jax predict` so that a
    file is classified from the pixels its evaluation saw."""
    gray = img.mode in _GRAY_MODES
    img = narrow_wide_gray(flatten_alpha(img, background))
    return img.convert("L") if gray else img.convert("RGB")


def open_image(data: bytes, name: str) -> Image.Image:
    """One JPEG/PNG file's bytes as a decoded Pillow image in mode "L" (grayscale files) or
    "RGB" (all others).

    Transparency is composited over white; 16-bit grayscale is scaled to 8 bits. Raises
    ImageDecodeError naming `name` when the bytes are not a readable image.
    """
    return open_image_reduced(data, name, None)[0]


def open_image_reduced(data: bytes, name: str,
                       factor_for: Callable[[int, int], int] | None
                       ) -> tuple[Image.Image, int]:
    """`open_image`, letting a JPEG decode smaller: (image, the factor it was shrunk by).

    `factor_for(width, height)` is called with the file's size before any pixel is decoded
    and returns 1, 2, 4 or 8; a JPEG is then decoded at 1/factor of its size by libjpeg's
    scaled inverse DCT (Pillow's `draft`), which costs a fraction of a full decode. Pixel x of
    the file is at x / factor in the image. Other formats always come back at factor 1.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            factor = 1
            if factor_for is not None:
                factor = _draft(img, factor_for(*img.size))
            img.load()  # decode now, so a truncated file fails here and names itself
            return as_gray_or_rgb(img), factor
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image Pillow can read (corrupt file or not a "
                               "JPEG/PNG)") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        raise ImageDecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def _draft(img: Image.Image, factor: int) -> int:
    """Asks the (not yet loaded) image's decoder for 1/factor of its size; the factor it took."""
    if factor <= 1:
        return 1
    width = img.size[0]
    # Pillow takes the largest power of two <= min(size // requested) as the scale.
    drafted = img.draft(None, (img.size[0] // factor, img.size[1] // factor))
    if drafted is None:  # not a JPEG (or several tiles): decoded at full size
        return 1
    return round(width / drafted[1][2])


def decode_image(data: bytes, name: str) -> np.ndarray:
    """One JPEG/PNG file's bytes as uint8 [H, W, C]: C = 1 for grayscale files, else 3 (RGB).

    See `open_image` for transparency, 16-bit grayscale and errors.
    """
    img = open_image(data, name)
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if img.mode == "L" else array


def decode_many(items: Sequence[tuple[str, bytes]]) -> list[np.ndarray]:
    """`decode_image` over `(name, bytes)` pairs: the unit of work a process pool runs."""
    return [decode_image(data, name) for name, data in items]
