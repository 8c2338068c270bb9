"""Image files -> uint8 arrays at a model's training resolution and channel count (Pillow).

The conversion mirrors what the model saw in training: uint8 pixels, H x W x C with C = 1
(grayscale, e.g. Fashion-MNIST) or 3 (RGB, e.g. CIFAR). Normalisation (mean image / channel
statistics) is applied later, on the device, with the run's own statistics.

A run trained on images of any size (`config.data.image_size`, the streaming pipeline) instead
takes a `CenterCrop`: each image is decoded in full and converted exactly as its evaluation
converted it (`image_ops.resize_center_crop`: shorter side to 256/224 x the size, centre crop),
so that a file's prediction is the one `resnet-jax evaluate` scored.

Large files are shrunk while they are decoded, so a 13,000 px photo never exists at full size
more than once: JPEGs decode directly at 1/2, 1/4 or 1/8 scale (Pillow's `draft`), and any image
at least `REDUCE_GAP` times the training size is box-reduced by an integer factor (`reduce`)
before the conversions and the final bilinear resize. `DecodeBudget` bounds how many full-size
pixels several threads decode at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from resnet_jax.data import image_ops
from resnet_jax.data.folder_source import to_channels
from resnet_jax.data.folders import as_gray_or_rgb, flatten_alpha, narrow_wide_gray

ImageInput = str | Path | Image.Image | np.ndarray
# Reduce by an integer factor only down to this multiple of the training size; the bilinear
# resize (antialiased in Pillow) does the rest, so small inputs are converted exactly as before.
REDUCE_GAP = 4
# Modes `Image.reduce` cannot handle, and the mode to convert them to first.
_REDUCIBLE_AS = {"1": "L", "P": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
# Bytes per pixel of a decoded image by mode (others: one byte per band).
_WIDE_MODES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
DEFAULT_DECODE_BUDGET = 512 << 20  # full-size decoded bytes in flight across decoding threads
_OPEN_LOCK = threading.Lock()
# After freeing a decode this large, hand the memory back to the OS (see _return_memory_to_os).
_TRIM_BYTES = 64 << 20


def _return_memory_to_os() -> None:
    """glibc keeps freed memory in the freeing thread's arena; each decoding thread would keep
    the largest image it decoded. `malloc_trim` returns it (no-op on other C libraries)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class ImageLoadError(ValueError):
    """An image file is missing, corrupt or in a format Pillow cannot read; names the file."""


@dataclasses.dataclass(frozen=True)
class CenterCrop:
    """The evaluation conversion of a run trained at `config.data.image_size`: the shorter side
    resized to `resize`, then the centre `size` x `size` crop."""

    size: int
    resize: int

    @classmethod
    def for_data(cls, data_config) -> CenterCrop | None:
        """The crop a run's `data` config evaluates with; None without `image_size` (images are
        then used at their own size, and predict resizes them to it)."""
        size = data_config.get("image_size")
        return None if size is None else cls(int(size), image_ops.eval_resize(int(size)))

    def to_json(self) -> dict[str, int]:
        """`{"size": ..., "resize": ...}`."""
        return {"size": self.size, "resize": self.resize}

    @classmethod
    def from_json(cls, record, where: str) -> CenterCrop:
        """The inverse of `to_json`; ValueError naming `where` if `record` is not one."""
        try:
            crop = cls(int(record["size"]), int(record["resize"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: center_crop must be {{'size': int, 'resize': int}}, got "
                             f"{record!r}") from None
        if crop.size < 1 or crop.resize < 1:
            raise ValueError(f"{where}: center_crop {record!r} needs positive sizes")
        return crop


def image_extensions() -> frozenset[str]:
    """Lower-case file suffixes (".png", ".jpg", ...) that Pillow can open."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """Files to classify: `(images, skipped)`.

    A file argument is always kept (a bad one is reported when read, naming it); a directory
    is searched recursively, in sorted order, for files with an image suffix, and other files
    there go to `skipped` (a README beside the images is not an error).
    """
    exts = image_extensions()
    images: list[Path] = []
    skipped: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            images.append(p)
            continue
        for f in sorted(p.rglob("*")):
            if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                continue
            (images if f.suffix.lower() in exts else skipped).append(f)
    return images, skipped


def _open_error(path: Path, e: BaseException) -> ImageLoadError:
    if isinstance(e, Image.DecompressionBombError):
        return ImageLoadError(f"{path}: too large to decode safely ({e}); downscale it first")
    return ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})")


def open_lazy(path: str | Path) -> Image.Image:
    """Opens an image file reading only its header; ImageLoadError naming it on failure.

    Pillow warns (DecompressionBombWarning) about images over `Image.MAX_IMAGE_PIXELS`; they
    are decoded shrunk and within a `DecodeBudget` here, so the warning is not shown. Images
    over twice that limit are refused with an ImageLoadError.
    """
    path = Path(path)
    try:
        # The warning filter is process-wide state: one thread at a time changes it.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{path}: not an image Pillow can read (unsupported format or corrupt file)"
        ) from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, ...
        raise _open_error(path, e) from None


def decoded_bytes(img: Image.Image) -> int:
    """Bytes the full decode of `img` takes (after any `draft`), from its header."""
    w, h = img.size
    return w * h * _WIDE_MODES.get(img.mode, len(img.getbands()))


def shrink_for(img: Image.Image, image_shape: Sequence[int]) -> Image.Image:
    """`img` box-reduced by the largest integer factor that keeps >= REDUCE_GAP x the target."""
    h, w = image_shape[:2]
    factor = min(img.width // (REDUCE_GAP * w), img.height // (REDUCE_GAP * h))
    if factor < 2:
        return img
    if img.mode in _REDUCIBLE_AS:
        mode = _REDUCIBLE_AS[img.mode]
        if img.mode == "P" and "transparency" not in img.info:
            mode = "RGB"
        img = img.convert(mode)
    return img.reduce(factor)


class DecodeBudget:
    """Bounds the full-size decoded bytes that threads hold at once.

    An image larger than the whole budget waits until it can run alone, so memory stays near
    max(budget, largest image) however many threads decode.
    """

    def __init__(self, max_bytes: int = DEFAULT_DECODE_BUDGET):
        self.max_bytes = max_bytes
        self._used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Blocks until `nbytes` (capped at the budget) fit, holds them for the block."""
        nbytes = min(nbytes, self.max_bytes)
        with self._cond:
            self._cond.wait_for(lambda: self._used + nbytes <= self.max_bytes)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


def decode(img: Image.Image, image_shape: Sequence[int],
           background: tuple[int, int, int] = (255, 255, 255),
           budget: DecodeBudget | None = None, crop: CenterCrop | None = None) -> np.ndarray:
    """Decodes an image from `open_lazy` straight to the model's uint8 [H, W, C]; closes it.

    Shrinks while decoding (see the module docstring) unless a `crop` asks for the evaluation's
    exact pixels and, with a `budget`, waits for room for the full-size pixels first. Raises
    ImageLoadError naming the file on a decoding failure.
    """
    h, w = image_shape[:2]
    name = Path(getattr(img, "filename", "") or "<image>")
    try:
        with img:
            if crop is None:  # evaluation decodes in full: a draft would change the pixels
                img.draft(None, (REDUCE_GAP * w, REDUCE_GAP * h))  # JPEG: at 1/2..1/8 size
            nbytes = decoded_bytes(img)
            with budget.reserve(nbytes) if budget else contextlib.nullcontext():
                try:
                    img.load()  # decode now: a truncated file fails here, not later in a batch
                    if crop is not None:
                        return to_model_array(img, image_shape, background, crop)
                    small = shrink_for(img, image_shape)
                    return to_model_array(small, image_shape, background)
                finally:
                    img.close()
                    if nbytes >= _TRIM_BYTES:
                        _return_memory_to_os()
    except ImageLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, ...
        raise _open_error(name, e) from None


def to_model_array(img: Image.Image, image_shape: Sequence[int],
                   background: tuple[int, int, int] = (255, 255, 255),
                   crop: CenterCrop | None = None) -> np.ndarray:
    """A PIL image as uint8 [H, W, C] for a model trained on `image_shape` (C is 1 or 3).

    Transparency is composited over `background` (white by default), colour is converted with
    Pillow (`convert("L")` uses ITU-R 601-2 luma; grayscale is replicated to RGB), and the
    image is resized (bilinear, aspect ratio not kept) to the training H x W. With a `crop`,
    the image is converted as the streaming pipeline's evaluation converts it instead: to
    grayscale or RGB by its own mode, resized and centre-cropped, then to C channels.
    """
    h, w, c = image_shape
    if c not in (1, 3):
        raise ValueError(f"models with {c} input channels are not supported (only 1 or 3)")
    if crop is not None:
        if (h, w) != (crop.size, crop.size):
            raise ValueError(f"a centre crop of {crop.size} px cannot feed a model trained on "
                             f"{h}x{w} images")
        out = image_ops.resize_center_crop(as_gray_or_rgb(img, background), crop.size,
                                           crop.resize)
        return np.ascontiguousarray(to_channels(out, c))
    img = narrow_wide_gray(flatten_alpha(img, background))
    mode = "L" if c == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if c == 1 else arr


def load_image(source: ImageInput, image_shape: Sequence[int],
               background: tuple[int, int, int] = (255, 255, 255),
               crop: CenterCrop | None = None) -> np.ndarray:
    """A file path, PIL image or uint8 array as uint8 [H, W, C] at the model's shape (see
    `to_model_array` for `crop`).

    Arrays already at `image_shape` pass through unchanged (no resampling, so pixels from a
    dataset give exactly the dataset's predictions); other uint8 arrays go through Pillow.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (0..255), got {source.dtype}")
        if tuple(source.shape) == tuple(image_shape):
            return source
        if source.ndim == 3 and source.shape[-1] == 1:
            source = source[..., 0]
        if source.ndim not in (2, 3):
            raise ValueError(f"an image array must be [H, W] or [H, W, C], got {source.shape}")
        source = Image.fromarray(source)
    elif not isinstance(source, Image.Image):
        return decode(open_lazy(source), image_shape, background, crop=crop)
    return to_model_array(source, image_shape, background, crop)
