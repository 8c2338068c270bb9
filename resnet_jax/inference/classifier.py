"""`resnet_jax.load(run_dir_or_export)`: a trained model as a callable, batched, jitted classifier.

```python
clf = resnet_jax.load("runs/r20")            # or "model.safetensors", step=..., best=True
probs = clf(images_u8_nhwc)                  # or a list of paths / PIL images -> [N, classes]
for p in clf.predict(["shoe.png", "bag.jpg"], top_k=3):
    print(p.source, p.top)
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from resnet_jax.data import DataSpec, NormStats, normalize, replicate, shard_batch
from resnet_jax.inference.export import save_export
from resnet_jax.inference.images import (
    DEFAULT_DECODE_BUDGET,
    CenterCrop,
    DecodeBudget,
    ImageInput,
    ImageLoadError,
    decode,
    load_image,
    open_lazy,
)

DEFAULT_BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One input's result: the top classes with probabilities, or why it could not be read."""

    source: str
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None

    @property
    def label(self) -> str | None:
        """The most probable class name (None if the input failed)."""
        return self.top[0][0] if self.top else None


def _make_forward(graphdef: nnx.GraphDef):
    """Jitted `(params, batch_stats, x_u8, stats) -> (logits, probabilities)`.

    The same computation as the training eval step (merge, normalise on the device, eval-mode
    BN), so a checkpoint's logits here match those its evaluation logged.
    """

    def forward(params, batch_stats, x_u8, stats: NormStats):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(normalize(x_u8, stats))
        return logits, jax.nn.softmax(logits, axis=-1)

    return jax.jit(forward)


class Classifier:
    """A restored model: parameters, BN statistics, normalisation and class names, no optimiser.

    Inputs are uint8 NHWC arrays at the training shape, or lists of file paths / PIL images /
    uint8 arrays (converted with `images.to_model_array`; with `center_crop`, as the run's
    evaluation converted its images). Work is done in fixed-size batches (the last one padded),
    sharded over all devices, so jit compiles once.
    """

    def __init__(self, *, model_config: ml_collections.ConfigDict, spec: DataSpec,
                 params: dict, batch_stats: dict, stats: NormStats, graphdef: nnx.GraphDef,
                 step: int | None = None, source: str = "", batch_size: int = DEFAULT_BATCH_SIZE,
                 mesh: Mesh | None = None, background: tuple[int, int, int] = (255, 255, 255),
                 center_crop: CenterCrop | None = None):
        from resnet_jax.train import make_mesh

        self.model_config = model_config
        self.spec = spec
        if center_crop is not None and tuple(spec.image_shape[:2]) != (center_crop.size,) * 2:
            raise ValueError(f"center_crop {center_crop} does not give the model's input shape "
                             f"{tuple(spec.image_shape)}")
        self.center_crop = center_crop
        self.step = step
        self.source = source
        self.background = background
        self.mesh = mesh if mesh is not None else make_mesh()
        # The batch is split over the mesh, so it must be a multiple of the device count.
        n = self.mesh.size
        self.batch_size = max(n, -(-int(batch_size) // n) * n)
        self._graphdef = graphdef
        self._params, self._batch_stats, self._stats = replicate(
            (params, batch_stats, NormStats(np.asarray(stats.mean, np.float32),
                                            np.asarray(stats.std, np.float32))), self.mesh)
        self._forward = _make_forward(graphdef)

    # --- metadata -------------------------------------------------------------------------
    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order."""
        return tuple(self.spec.class_names)

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return int(self.spec.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The training input shape (H, W, C) that every input is converted to: resized to it,
        or with `center_crop` (runs trained at config.data.image_size) resized so that the
        shorter side is `center_crop.resize` and centre-cropped to it."""
        return tuple(self.spec.image_shape)

    @property
    def stats(self) -> NormStats:
        """The training normalisation statistics, as host numpy arrays."""
        return NormStats(*(np.asarray(jax.device_get(x)) for x in self._stats))

    def params(self) -> tuple[dict, dict]:
        """`(params, batch_stats)` as nested dicts of host numpy arrays."""
        return jax.device_get((self._params, self._batch_stats))

    def __repr__(self) -> str:
        m = self.model_config
        crop = "" if self.center_crop is None else (
            f" (shorter side {self.center_crop.resize}, centre crop)")
        return (f"Classifier({m.family} depth={m.depth}, {self.num_classes} classes, "
                f"input {self.image_shape}{crop}, step={self.step}, from {self.source})")

    # --- inputs -----------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray | Sequence[ImageInput]) -> np.ndarray:
        """Inputs as one uint8 [N, H, W, C] array; a bad file raises ImageLoadError naming it."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype == np.uint8 and tuple(images.shape[1:]) == self.image_shape:
                return images
            images = list(images)
        elif isinstance(images, np.ndarray) and tuple(images.shape) == self.image_shape:
            return images[None]
        elif isinstance(images, (str, Path, np.ndarray, Image.Image)) or not isinstance(
                images, Iterable):
            images = [images]  # a single image
        arrays = [load_image(x, self.image_shape, self.background, self.center_crop)
                  for x in images]
        if not arrays:
            return np.zeros((0, *self.image_shape), np.uint8)
        return np.stack(arrays)

    # --- device work ------------------------------------------------------------------------
    def _dispatch(self, x_u8: np.ndarray):
        """Starts one padded batch on the devices (asynchronously); returns device outputs."""
        k = len(x_u8)
        if k < self.batch_size:
            pad = np.zeros((self.batch_size - k, *x_u8.shape[1:]), np.uint8)
            x_u8 = np.concatenate([x_u8, pad])
        x = shard_batch(x_u8, self.mesh)
        return self._forward(self._params, self._batch_stats, x, self._stats)

    def _run(self, x_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(x_u8)
        outs = [self._dispatch(x_u8[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        logits = [np.asarray(jax.device_get(lg)) for lg, _ in outs]
        probs = [np.asarray(jax.device_get(p)) for _, p in outs]
        if not outs:
            empty = np.zeros((0, self.num_classes), np.float32)
            return empty, empty
        return np.concatenate(logits)[:n], np.concatenate(probs)[:n]

    def logits(self, images: np.ndarray | Sequence[ImageInput]) -> np.ndarray:
        """float32 [N, classes] logits."""
        return self._run(self.preprocess(images))[0]

    def __call__(self, images: np.ndarray | Sequence[ImageInput]) -> np.ndarray:
        """float32 [N, classes] class probabilities (softmax of the logits)."""
        return self._run(self.preprocess(images))[1]

    def _load_one(self, source: ImageInput, budget: DecodeBudget) -> np.ndarray | str:
        try:
            if isinstance(source, (str, Path)):
                return decode(open_lazy(source), self.image_shape, self.background, budget,
                              self.center_crop)
            return load_image(source, self.image_shape, self.background, self.center_crop)
        except (ImageLoadError, ValueError) as e:
            return str(e) if isinstance(e, ImageLoadError) else f"{_name(source)}: {e}"

    def _finish(self, sources, loaded, out, top_k: int) -> Iterator[Prediction]:
        probs = np.asarray(jax.device_get(out[1])) if out is not None else None
        j = 0
        for src, item in zip(sources, loaded, strict=True):
            if isinstance(item, str):
                yield Prediction(_name(src), error=item)
                continue
            p = probs[j]
            j += 1
            order = np.argsort(-p, kind="stable")[:top_k]
            yield Prediction(_name(src), tuple((self.class_names[i], float(p[i])) for i in order))

    def iter_predict(self, inputs: Iterable[ImageInput], top_k: int = 5,
                     workers: int | None = None,
                     decode_budget: int = DEFAULT_DECODE_BUDGET) -> Iterator[Prediction]:
        """Streams a `Prediction` per input, in order; bad files yield one with `.error` set.

        Files are decoded by a thread pool (Pillow releases the GIL) while the previous batch
        runs on the devices, so a large folder is limited by decoding or the device, not both.
        At most `decode_budget` bytes of full-size pixels are decoded at once (a larger image
        alone), and each image is shrunk as it is decoded, so memory stays bounded however
        large or many the files are.
        """
        top_k = max(1, min(int(top_k), self.num_classes))
        inputs = list(inputs)
        budget = DecodeBudget(decode_budget)
        pending = None
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i in range(0, len(inputs), self.batch_size):
                chunk = inputs[i:i + self.batch_size]
                loaded = list(pool.map(lambda x: self._load_one(x, budget), chunk))
                good = [x for x in loaded if not isinstance(x, str)]
                out = self._dispatch(np.stack(good)) if good else None
                if pending is not None:
                    yield from self._finish(*pending, top_k)
                pending = (chunk, loaded, out)
            if pending is not None:
                yield from self._finish(*pending, top_k)

    def predict(self, inputs: Iterable[ImageInput], top_k: int = 5) -> list[Prediction]:
        """A `Prediction` (top-k class names with probabilities, or an error) per input."""
        return list(self.iter_predict(inputs, top_k))

    def export(self, path: str | Path) -> Path:
        """Writes this model as one self-describing safetensors file (see `export.py`)."""
        return save_export(self, path)


def _name(source: ImageInput) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"
