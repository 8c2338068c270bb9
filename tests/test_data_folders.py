"""Class-folder datasets (source="folder"): folders and tars the tests write, catalogued names
and image_folder, errors that name the bad file, the decoded-images cache, the process pool."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_jax.config import ConfigError, get_preset, validate
from resnet_jax.data import (
    FolderLayoutError,
    ImageDecodeError,
    default_data_config,
    folder_source,
    get_info,
    load_dataset,
    load_raw,
    split_indices,
)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def _make_tree(root: Path, classes, per_class: dict[str, int], shape, seed=0) -> dict:
    """PNG files root/<split>/<class>/<i>.png; returns {split: {class: [arrays in file order]}}."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for split, n in per_class.items():
        for c in classes:
            for i in range(n):
                x = rng.integers(0, 256, shape, dtype=np.uint8)
                _write_png(root / split / c / f"{i:03d}.png", x)
                out.setdefault(split, {}).setdefault(c, []).append(x)
    return out


def _tar(src: Path, dest: Path, arcname: str = "") -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=f"{arcname}{p.relative_to(src).as_posix()}", recursive=False)
    return dest


def _cfg(name, data_dir, cache, **kw):
    c = default_data_config()
    c.name, c.source, c.data_dir, c.cache_dir = name, "folder", str(data_dir), str(cache)
    for k, v in kw.items():
        c[k] = v
    return c


def test_image_folder_classes_shape_and_pixels_from_the_data(tmp_path):
    data = _make_tree(tmp_path / "d", ["zebra", "ant", "moth"], {"train": 3, "val": 2}, (8, 6, 3))
    (tmp_path / "d" / "train" / "README.txt").write_text("not an image")
    (tmp_path / "d" / "train" / "ant" / ".hidden.png").write_bytes(b"junk")

    (x, y), (xt, yt), names, source = load_raw("image_folder", "folder", str(tmp_path / "d"),
                                               str(tmp_path / "cache"))
    assert source == "folder" and names == ("ant", "moth", "zebra")  # sorted folder names
    want = np.stack([a for c in names for a in data["train"][c]])
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 3))
    np.testing.assert_array_equal(xt, np.stack([a for c in names for a in data["val"][c]]))
    np.testing.assert_array_equal(yt, np.repeat([0, 1, 2], 2))

    ds = load_dataset(_cfg("image_folder", tmp_path / "d", tmp_path / "cache", validation_size=2))
    assert ds.spec.image_shape == (8, 6, 3) and ds.spec.num_classes == 3
    assert ds.spec.class_names == ("ant", "moth", "zebra") and ds.spec.source == "folder"
    tr, va = split_indices(9, 2, 0)
    np.testing.assert_array_equal(ds.train_images, want[tr])
    np.testing.assert_array_equal(ds.validation_labels, y[va])


def test_catalogued_tar_labels_follow_the_catalogue(tmp_path):
    # Fashion-MNIST: sorted folder names differ from the catalogue's label order, and
    # "T-shirt/top" lives in folder "T-shirt_top".
    classes = get_info("fashion_mnist").class_names
    folders = [c.replace("/", "_") for c in classes]
    data = _make_tree(tmp_path / "d", folders, {"train": 1, "test": 1}, (28, 28, 1))
    colour = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    _write_png(tmp_path / "d" / "test" / "Bag" / "001.png", colour)  # RGB in a gray dataset
    archive = _tar(tmp_path / "d", tmp_path / "fmnist.tar.gz", arcname="fmnist/")

    (x, y), (xt, yt), names, _ = load_raw("fashion_mnist", "folder", str(archive),
                                          str(tmp_path / "cache"))
    assert names == classes
    order = sorted(range(10), key=lambda i: folders[i])  # files are read in folder order
    np.testing.assert_array_equal(y, order)
    np.testing.assert_array_equal(x, np.stack([data["train"][folders[i]][0] for i in order]))
    bag = classes.index("Bag")
    assert list(yt).count(bag) == 2 and xt.shape == (11, 28, 28, 1)
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    assert any(np.array_equal(img[..., 0], luma) for img in xt[yt == bag])


def test_wrong_class_folder_is_named_with_the_expected_ones(tmp_path):
    classes = list(get_info("cifar10").class_names)
    _make_tree(tmp_path / "d", [*classes[:-1], "trucks"], {"train": 1, "test": 1}, (32, 32, 3))
    with pytest.raises(FolderLayoutError) as e:
        load_raw("cifar10", "folder", str(tmp_path / "d"), str(tmp_path / "cache"))
    msg = str(e.value)
    assert "train/trucks/" in msg and "airplane, automobile" in msg and "truck" in msg


def test_catalogued_shape_mismatch_names_a_file(tmp_path):
    _make_tree(tmp_path / "d", get_info("cifar10").class_names, {"train": 1, "test": 1},
               (28, 28, 3))
    with pytest.raises(FolderLayoutError, match=r"train/airplane/000\.png.*28x28.*32x32x3"):
        load_raw("cifar10", "folder", str(tmp_path / "d"), str(tmp_path / "cache"))


def test_image_of_another_size_is_named(tmp_path):
    _make_tree(tmp_path / "d", ["a", "b"], {"train": 3, "test": 1}, (8, 8, 3))
    odd = tmp_path / "d" / "train" / "b" / "001.png"
    _write_png(odd, np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(FolderLayoutError, match=f"{odd}.* 9x8 .*5 of the 6 images.*8x8"):
        load_raw("image_folder", "folder", str(tmp_path / "d"), str(tmp_path / "cache"))


@pytest.mark.parametrize("as_tar", [False, True])
def test_corrupt_image_is_named(tmp_path, as_tar):
    _make_tree(tmp_path / "d", ["a", "b"], {"train": 2, "test": 1}, (64, 64, 3))
    bad = tmp_path / "d" / "train" / "b" / "001.png"
    data = bad.read_bytes()
    if as_tar:  # not an image at all
        bad.write_bytes(b"\x89PNG garbage")
        why = "not an image Pillow can read"
    else:  # a valid header, then the pixel data cut short
        bad.write_bytes(data[: len(data) // 2])
        why = "cannot decode image"
    src = _tar(tmp_path / "d", tmp_path / "d.tar") if as_tar else tmp_path / "d"
    want = f"{src}:train/b/001.png" if as_tar else str(bad)
    with pytest.raises(ImageDecodeError, match=f"{want}: {why}".replace(".", r"\.")):
        load_raw("image_folder", "folder", str(src), str(tmp_path / "cache"))


def test_layout_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    _write_png(tmp_path / "flat" / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FolderLayoutError, match="no train/ folder.*x.png"):
        load_raw("image_folder", "folder", str(tmp_path / "flat"), str(tmp_path / "cache"))
    _make_tree(tmp_path / "only_train", ["a"], {"train": 1}, (4, 4, 3))
    with pytest.raises(FolderLayoutError, match="no held-out split: expected a test/"):
        load_raw("image_folder", "folder", str(tmp_path / "only_train"), str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_raw("image_folder", "folder", str(tmp_path / "nowhere"), str(tmp_path / "c"))


def test_cache_is_used_and_a_changed_source_invalidates_it(tmp_path, monkeypatch):
    _make_tree(tmp_path / "d", ["a", "b"], {"train": 2, "test": 1}, (4, 4, 3))
    archive = _tar(tmp_path / "d", tmp_path / "d.tar.gz")
    cache = tmp_path / "cache"
    for src in (tmp_path / "d", archive):
        first = load_raw("image_folder", "folder", str(src), str(cache))

        def no_decoding(items):
            raise AssertionError("decoded again although the source did not change")

        monkeypatch.setattr(folder_source, "decode_many", no_decoding)
        again = load_raw("image_folder", "folder", str(src), str(cache))
        np.testing.assert_array_equal(first[0][0], again[0][0])
        monkeypatch.undo()

    # A changed image file (new pixels, size kept) is decoded again.
    changed = tmp_path / "d" / "train" / "b" / "001.png"
    new = np.full((4, 4, 3), 7, np.uint8)
    _write_png(changed, new)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (x, _), _, _, _ = load_raw("image_folder", "folder", str(tmp_path / "d"), str(cache))
    np.testing.assert_array_equal(x[3], new)
    # A rewritten archive is decoded again.
    _tar(tmp_path / "d", archive)
    os.utime(archive, ns=(st.st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    (x, _), _, _, _ = load_raw("image_folder", "folder", str(archive), str(cache))
    np.testing.assert_array_equal(x[3], new)
    assert len(list(cache.iterdir())) == 4  # train + held-out per source, stale files replaced


def test_parallel_decoding_equals_decoding_here(tmp_path, monkeypatch):
    _make_tree(tmp_path / "d", ["a", "b", "c"], {"train": 4, "test": 2}, (6, 5, 3))
    serial = folder_source.load_folder(str(tmp_path / "d"), dataset="image_folder",
                                       cache_dir=str(tmp_path / "c1"), workers=1)
    monkeypatch.setattr(folder_source, "PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(folder_source, "CHUNK", 5)  # several tasks, results kept in order
    seen = []
    real = folder_source._decode_in_pool
    monkeypatch.setattr(folder_source, "_decode_in_pool",
                        lambda *a: seen.append(a[2]) or real(*a))
    pooled = folder_source.load_folder(str(tmp_path / "d"), dataset="image_folder",
                                       cache_dir=str(tmp_path / "c2"), workers=2)
    assert seen == [2]
    for split in ("train", "held_out"):
        np.testing.assert_array_equal(serial[0][split][0], pooled[0][split][0])
        np.testing.assert_array_equal(serial[0][split][1], pooled[0][split][1])


def test_config_errors_name_the_fix():
    config = get_preset("quick")
    config.data.source = "folder"
    with pytest.raises(ConfigError, match="source='folder' needs config.data.data_dir"):
        validate(config)
    config.data.name, config.data.source, config.data.data_dir = "image_folder", "tfds", "/x"
    with pytest.raises(ConfigError, match="image_folder.*'folder' \\(not 'tfds'\\)"):
        validate(config)
    config.data.name = "imagefolder"
    with pytest.raises(ConfigError, match="did you mean image_folder"):
        validate(config)


def test_auto_source_finds_class_folders(tmp_path):
    _make_tree(tmp_path / "d", get_info("mnist").class_names, {"train": 1, "test": 1},
               (28, 28, 1))
    *_, source = load_raw("mnist", "auto", str(tmp_path / "d"), str(tmp_path / "cache"))
    assert source == "folder"


def test_tar_with_a_top_folder_and_dot_prefix(tmp_path):
    # A tar's layout is found from its member names, also under a top folder and with "./".
    _make_tree(tmp_path / "d", ["a"], {"train": 1, "test": 1}, (4, 4, 3))
    buf = tmp_path / "dot.tar"
    with tarfile.open(buf, "w") as tar:
        for p in sorted((tmp_path / "d").rglob("*.png")):
            data = p.read_bytes()
            info = tarfile.TarInfo(f"./top/{p.relative_to(tmp_path / 'd').as_posix()}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (x, y), (xt, _), names, _ = load_raw("image_folder", "folder", str(buf), str(tmp_path / "c"))
    assert names == ("a",) and x.shape == (1, 4, 4, 3) and xt.shape == (1, 4, 4, 3)
