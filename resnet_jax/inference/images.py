"""Image files -> uint8 arrays at a model's training resolution and channel count (Pillow).

The conversion mirrors what the model saw in training: uint8 pixels, H x W x C with C = 1
(grayscale, e.g. Fashion-MNIST) or 3 (RGB, e.g. CIFAR). Normalisation (mean image / channel
statistics) is applied later, on the device, with the run's own statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes that carry an alpha channel; "P"/"L"/"RGB" images may also have a tRNS transparency.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# 16/32-bit integer grayscale: Pillow's convert("L") clips instead of rescaling, so do it here.
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}

ImageInput = str | Path | Image.Image | np.ndarray


class ImageLoadError(ValueError):
    """An image file is missing, corrupt or in a format Pillow cannot read; names the file."""


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


def open_image(path: str | Path) -> Image.Image:
    """Opens and fully decodes an image file; raises ImageLoadError naming it on any failure."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a batch
            return img.copy()
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{path}: not an image Pillow can read (unsupported format or corrupt file)"
        ) from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _flatten_alpha(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composites transparent pixels over `background` so they get a defined colour."""
    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_model_array(img: Image.Image, image_shape: Sequence[int],
                   background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """A PIL image as uint8 [H, W, C] for a model trained on `image_shape` (C is 1 or 3).

    Transparency is composited over `background` (white by default), colour is converted with
    Pillow (`convert("L")` uses ITU-R 601-2 luma; grayscale is replicated to RGB), and the
    image is resized (bilinear, aspect ratio not kept) to the training H x W.
    """
    h, w, c = image_shape
    if c not in (1, 3):
        raise ValueError(f"models with {c} input channels are not supported (only 1 or 3)")
    img = _flatten_alpha(img, background)
    if img.mode in _WIDE_GRAY_MODES:
        # 16-bit PNGs: map 0..65535 onto 0..255 instead of letting Pillow clip at 255.
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    mode = "L" if c == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if c == 1 else arr


def load_image(source: ImageInput, image_shape: Sequence[int],
               background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """A file path, PIL image or uint8 array as uint8 [H, W, C] at the model's shape.

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
        source = open_image(source)
    return to_model_array(source, image_shape, background)
