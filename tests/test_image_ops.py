"""The streaming pipeline's crops from JPEG bytes: decoded at 1/2..1/8 only when the crop stays
at least the output's size, close to a full decode then, identical to it otherwise."""

import io

import numpy as np
import pytest
from PIL import Image

from resnet_jax.bench.input_pipeline import jpeg_bytes, photo_like
from resnet_jax.data import image_ops
from resnet_jax.data.folders import open_image, open_image_reduced

SIZE = 224
# Measured on this test's photo-like 600x560 JPEG: draft-decoded crops differ from the full
# decode's by 2.5-3.9 (mean abs, of 255; the most when the box is exactly 2x the output), about
# as much as Pillow's bicubic and bilinear resizes of one full decode differ (2.2-2.4). Half a
# decoded pixel of misplaced box gives ~9.7, so the bound also guards the box's scaling.
MAX_MEAN_ABS_DIFF = 5.0


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg_bytes(photo_like(np.random.default_rng(0), 560, 600))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def test_draft_factor_keeps_the_crop_at_least_the_output_size():
    assert image_ops.draft_factor((0, 0, 447, 1000), SIZE) == 1  # 447 / 2 < 224
    assert image_ops.draft_factor((10, 20, 458, 468), SIZE) == 2  # 448 / 2 = 224
    assert image_ops.draft_factor((0, 0, 1000, 900), SIZE) == 4  # 900 / 4 >= 224 > 900 / 8
    assert image_ops.draft_factor((0, 0, 4000, 4000), SIZE) == 8  # libjpeg's smallest scale
    assert image_ops.draft_factor((0.5, 0.5, 100.5, 100.5), SIZE) == 1  # upsampled crop


def test_reduced_open_decodes_a_jpeg_at_the_factor_asked_and_a_png_whole(photo):
    seen = []
    img, factor = open_image_reduced(photo, "p.jpg", lambda w, h: seen.append((w, h)) or 4)
    assert seen == [(600, 560)]  # the file's own size, before decoding
    assert (factor, img.size, img.mode) == (4, (150, 140), "RGB")
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(buf, "PNG")
    img, factor = open_image_reduced(buf.getvalue(), "p.png", lambda w, h: 4)
    assert (factor, img.size) == (1, (600, 560))


def test_eval_crop_of_a_large_jpeg_is_drafted_and_close_to_the_full_decode(photo):
    # Shorter side 560 >= 2 x 256: decoded at 1/2.
    assert image_ops.draft_factor(image_ops.center_crop_box(600, 560, SIZE), SIZE) == 2
    full = image_ops.resize_center_crop(open_image(photo, "p.jpg"), SIZE)
    drafted = image_ops.decode_resize_center_crop(photo, "p.jpg", SIZE)
    assert drafted.shape == full.shape == (SIZE, SIZE, 3)
    assert 0 < _mad(drafted, full) < MAX_MEAN_ABS_DIFF
    # An eval crop of 64 px: decoded at 1/8, still close.
    full = image_ops.resize_center_crop(open_image(photo, "p.jpg"), 64)
    assert 0 < _mad(image_ops.decode_resize_center_crop(photo, "p.jpg", 64), full) < (
        MAX_MEAN_ABS_DIFF)


def test_training_crops_are_drafted_only_when_their_box_allows(photo):
    full_image = open_image(photo, "p.jpg")
    drafted_seeds = small_seeds = 0
    for seed in range(16):
        box = image_ops.random_resized_crop_box(600, 560, np.random.default_rng(seed))
        rng_full, rng_bytes = np.random.default_rng(seed), np.random.default_rng(seed)
        full = image_ops.random_resized_crop(full_image, rng_full, SIZE)
        out = image_ops.decode_random_resized_crop(photo, "p.jpg", rng_bytes, SIZE)
        assert rng_full.random() == rng_bytes.random()  # same draws: the flip after it agrees
        if min(box[2] - box[0], box[3] - box[1]) < 2 * SIZE:
            np.testing.assert_array_equal(out, full)  # a small crop decodes in full
            small_seeds += 1
        else:
            assert 0 < _mad(out, full) < MAX_MEAN_ABS_DIFF
            drafted_seeds += 1
    assert drafted_seeds >= 3 and small_seeds >= 3  # both cases covered by these seeds
