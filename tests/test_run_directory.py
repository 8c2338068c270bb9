"""A run directory is self-contained: predict, export and load need no data once training has
started; evaluate needs only the split it scores; old runs without a spec still load."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

import resnet_jax
from resnet_jax.cli import main
from resnet_jax.data import load_dataset
from resnet_jax.rundir.spec import SPEC_FILE, STATS_FILE, read_spec
from resnet_jax.train import train_and_evaluate

# Written in reverse order: image_folder's classes are the sorted folder names.
CLASSES = [f"kind_{c}" for c in "jihgfedcba"]


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=0)  # fast; size is no matter
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    """{"train/<class>/<i>.png": PNG bytes}: 500 training and 2 test images per class."""
    rng = np.random.default_rng(0)
    return {f"{split}/{c}/{i}.png": _png(rng.integers(0, 256, (28, 28), dtype=np.uint8))
            for split, n in (("train", 500), ("test", 2)) for c in CLASSES for i in range(n)}


def _write_archive(path: Path, files: dict[str, bytes], splits=("train", "test")) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            if name.split("/")[0] in splits:
                info = tarfile.TarInfo(f"shapes/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _predict_json(capsys, *args) -> list[dict]:
    capsys.readouterr()  # drop what came before
    assert main(["predict", "--json", *map(str, args)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_export_and_load_after_the_archive_is_deleted(tmp_path, capsys):
    archive, cache, run = tmp_path / "shapes.tar.gz", tmp_path / "cache", tmp_path / "run"
    files = _images()
    _write_archive(archive, files)
    # The shared tiny run's config and shapes (ResNet-8, 20 steps of 5 per call, 4,500 training
    # images of 28x28x1, 10 classes), so its compiled steps come from the compilation cache.
    config = tiny_config(steps_per_call=5)
    config.data.name, config.data.source = "image_folder", "folder"
    config.data.data_dir, config.data.cache_dir = str(archive), str(cache)
    config.data.decode_workers = 1
    train_and_evaluate(config, run, interactive=False)
    ds = load_dataset(config.data)

    saved = json.loads((run / SPEC_FILE).read_text())
    assert saved["class_names"] == sorted(CLASSES) and saved["name"] == "image_folder"
    assert saved["image_shape"] == [28, 28, 1] and saved["num_classes"] == 10
    assert saved["normalization"] == "mean_image" and saved["num_train"] == 4500
    spec, stats = read_spec(run)
    assert spec == ds.spec
    np.testing.assert_array_equal(stats.mean, ds.stats.mean)
    np.testing.assert_array_equal(stats.std, ds.stats.std)

    x = ds.test_images[:4]
    inputs = [tmp_path / f"{i}.png" for i in range(4)]
    for f, img in zip(inputs, x, strict=True):
        Image.fromarray(img[..., 0]).save(f)
    before = resnet_jax.load(run)(x)
    archive.unlink()  # the training data is gone, decoded copies included
    shutil.rmtree(cache)

    clf = resnet_jax.load(run)
    assert clf.class_names == tuple(sorted(CLASSES)) and clf.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(clf(x), before)
    lines = _predict_json(capsys, "--workdir", run, "--top-k", "3", *inputs)
    for r, p in zip(lines, before, strict=True):
        order = np.argsort(-p, kind="stable")[:3]
        assert [name for name, _ in r["top"]] == [sorted(CLASSES)[i] for i in order]
        np.testing.assert_allclose([pr for _, pr in r["top"]], p[order], rtol=1e-6)
    out = tmp_path / "model.safetensors"
    assert main(["export", "--workdir", str(run), "--out", str(out)]) == 0
    np.testing.assert_array_equal(resnet_jax.load(out)(x), before)

    # Scoring a split needs that split's data, and only that split's.
    assert main(["evaluate", "--workdir", str(run)]) == 2
    assert f"{archive}: no such directory or archive" in capsys.readouterr().err
    _write_archive(archive, files, splits=("test",))
    assert main(["evaluate", "--workdir", str(run), "--split", "test"]) == 0
    summary = json.loads((run / "eval" / "test_step20.json").read_text())
    assert summary["count"] == 20 and summary["class_names"] == sorted(CLASSES)
    assert summary["error"] == summary["logged"]["error"]  # labels and statistics as in training
    assert main(["evaluate", "--workdir", str(run), "--split", "validation"]) == 2
    assert "no train/ folder" in capsys.readouterr().err

    # A run from before the spec existed falls back to loading its dataset.
    for name in (SPEC_FILE, STATS_FILE):
        (run / name).unlink()
    with pytest.raises(ValueError, match="no train/ folder"):
        resnet_jax.load(run)
    _write_archive(archive, files)
    np.testing.assert_array_equal(resnet_jax.load(run)(x), before)
