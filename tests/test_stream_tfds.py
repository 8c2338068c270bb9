"""The streaming pipeline's TFDS source on real array_record files written here, without
TensorFlow or network.

`tfds.testing.mock_data` cannot stand in: with `SkipDecoding` (how the stream reads TFDS, so that
its own workers decode) the mock encodes its random images with TensorFlow. So each test writes
a small prepared dataset the way TFDS lays one out (`<data_dir>/<name>/<version>/` with
`dataset_info.json`, `features.json` and `<name>-<split>.array_record-*` files of serialized
examples) and the library reads it through `tfds.data_source` as it reads a real one.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import DatasetNotFoundError, default_data_config, stream, tfds_source

tfds = pytest.importorskip("tensorflow_datasets")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
array_record = pytest.importorskip("array_record.python.array_record_module")


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format=fmt)
    return buf.getvalue()


def write_prepared(data_dir, name: str, splits: dict, file_format: str = "array_record",
                   label_names: list[str] | None = None):
    """A prepared TFDS dataset `name` in `data_dir`: `splits` maps a split to a list of
    (uint8 [H, W, C] image, label), stored encoded as the dataset's image feature declares.
    `label_names`: the names TFDS's preparation reads from the download (CIFAR's)."""
    builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
    os.makedirs(builder.data_dir, exist_ok=True)
    features = builder.info.features
    if label_names:
        features["label"].names = label_names
    fmt = "JPEG" if features["image"].encoding_format == "jpeg" else "PNG"
    text = [k for k in features if k not in ("image", "label")]  # "id" / "file_name"
    infos = []
    for split, examples in splits.items():
        path = os.path.join(builder.data_dir, f"{name}-{split}.{file_format}-00000-of-00001")
        if file_format == "array_record":
            writer = array_record.ArrayRecordWriter(path, "group_size:1")
            for i, (image, label) in enumerate(examples):
                writer.write(features.serialize_example(
                    {"image": encode(image, fmt), "label": label,
                     **{k: f"{split}_{i}" for k in text}}))
            writer.close()
        else:  # only the metadata matters: TFDS refuses to index it before reading a byte
            open(path, "wb").close()
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)],
                                         num_bytes=os.path.getsize(path)))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)


def examples(rng, n: int, classes: int = 10, shape=(32, 32, 3)) -> list:
    return [(rng.integers(0, 256, shape, dtype=np.uint8), int(rng.integers(0, classes)))
            for _ in range(n)]


def stream_config(name: str, data_dir, **kw):
    c = default_data_config()
    c.name, c.source, c.pipeline, c.data_dir = name, "tfds", "stream", str(data_dir)
    c.stream_threads = 1
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """A prepared cifar10 (PNG records): 12 training and 5 test examples."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path_factory.mktemp("tfds")
    splits = {"train": examples(rng, 12), "test": examples(rng, 5)}
    write_prepared(data_dir, "cifar10", splits, label_names=list(CIFAR10_NAMES))
    return data_dir, splits


def test_cifar10_streams_the_prepared_records(cifar10):
    data_dir, written = cifar10
    splits = stream.open_stream(stream_config("cifar10", data_dir, validation_size=2))
    spec = splits.spec
    assert (spec.source, spec.num_classes, spec.image_shape) == ("tfds", 10, (32, 32, 3))
    assert (spec.num_train, spec.num_validation, spec.num_test) == (10, 2, 5)
    assert spec.class_names == CIFAR10_NAMES
    # The records are the encoded files (what array_record + SkipDecoding gives), not arrays.
    name, image, label = splits.test[3]
    assert isinstance(image, bytes) and image.startswith(b"\x89PNG")
    assert (name, label) == ("tfds:cifar10/test[3]", written["test"][3][1])

    # Training batches: each row is one written image (PNG is lossless) with its own label.
    label_of = {img.tobytes(): lab for img, lab in written["train"]}
    seen = set()
    for step in range(3):  # 12 rows: past the 10-example epoch into the next
        x, y = stream.train_dataset(splits, 4, seed=0)[step]
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
        assert [label_of[row.tobytes()] for row in x] == y.tolist()
        seen.update(row.tobytes() for row in x)
    held_out = {written["train"][i][0].tobytes() for i in splits.validation.indices}
    assert len(seen) == 10 and not seen & held_out  # the validation hold-out is never trained on

    # Evaluation: the test split in order, once, the last batch padded and masked.
    ds, n = stream.eval_dataset(splits, "test", 4)
    batches = [ds[i] for i in range(len(ds))]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    mask = np.concatenate([b[2] for b in batches])
    assert n == 5 and images.dtype == np.uint8 and labels.dtype == np.int32
    assert mask.tolist() == [True] * 5 + [False] * 3
    np.testing.assert_array_equal(images[:5], np.stack([img for img, _ in written["test"]]))
    assert labels[:5].tolist() == [lab for _, lab in written["test"]]


def test_imagenet2012_holds_out_validation_and_crops(tmp_path):
    """JPEGs of several sizes; TFDS's imagenet2012 also has an unlabelled "test" split (label -1),
    which must not be the held-out one."""
    rng = np.random.default_rng(1)
    sizes = [(40, 56), (64, 48), (50, 50), (72, 40), (45, 60), (36, 80)]
    gray = rng.integers(0, 256, (48, 64, 1), dtype=np.uint8)  # ImageNet has grayscale JPEGs
    train = [(gray, 7)] + [(rng.integers(0, 256, (*s, 3), dtype=np.uint8), i)
                           for i, s in enumerate(sizes)]
    validation = [(rng.integers(0, 256, (60, 44, 3), dtype=np.uint8), lab) for lab in (5, 999, 0)]
    test = [(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), -1)] * 2
    write_prepared(tmp_path, "imagenet2012",
                   {"train": train, "validation": validation, "test": test})

    config = stream_config("imagenet2012", tmp_path, validation_size=1, image_size=32,
                           normalization="imagenet")
    splits = stream.open_stream(config)
    spec = splits.spec
    assert (spec.num_train, spec.num_validation, spec.num_test) == (6, 1, 3)
    # Channels come from TFDS's image feature (RGB), not from the first (grayscale) record.
    assert spec.image_shape == (32, 32, 3) and spec.num_classes == 1000
    assert spec.class_names[0] == "n01440764"  # TFDS's WordNet ids, not the catalogue's "0"
    x, y = stream.train_dataset(splits, 6, seed=0)[0]
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8
    assert sorted(y.tolist()) == sorted(lab for _, lab in (train[i] for i in splits.train.indices))
    ds, n = stream.eval_dataset(splits, "test", 2)
    batches = [ds[i] for i in range(len(ds))]
    assert n == 3 and all(b[0].shape == (2, 32, 32, 3) for b in batches)
    assert np.concatenate([b[1] for b in batches])[:3].tolist() == [5, 999, 0]


def test_imagenet2012_without_its_validation_split(tmp_path):
    rng = np.random.default_rng(2)
    write_prepared(tmp_path, "imagenet2012", {"train": examples(rng, 3, 1000, (40, 40, 3)),
                                              "test": examples(rng, 2, 1000, (40, 40, 3))})
    with pytest.raises(DatasetNotFoundError, match=r"no 'validation' split.*\['test', 'train'\]"):
        stream.open_stream(stream_config("imagenet2012", tmp_path, image_size=32))


def test_unlabelled_record_is_named(tmp_path):
    rng = np.random.default_rng(3)
    (image, _), (other, _) = examples(rng, 2)
    write_prepared(tmp_path, "cifar10", {"train": examples(rng, 4),
                                         "test": [(image, 3), (other, -1)]})
    splits = stream.open_stream(stream_config("cifar10", tmp_path, validation_size=0))
    assert splits.test[0][2] == 3
    with pytest.raises(ValueError, match=r"tfds:cifar10/test\[1\]: label -1 is outside \[0, 10\)"):
        splits.test[1]


def test_tfrecord_prepared_data_says_to_prepare_array_record(tmp_path):
    write_prepared(tmp_path, "cifar10", {"train": [None] * 3, "test": [None] * 2},
                   file_format="tfrecord")
    assert json.loads((tmp_path / "cifar10/3.0.2/dataset_info.json").read_text())[
        "fileFormat"] == "tfrecord"
    with pytest.raises(DatasetNotFoundError, match=r"no array_record files.*tfrecord.*"
                       r"file_format='array_record'\)\.download_and_prepare"):
        stream.open_stream(stream_config("cifar10", tmp_path))
    # The resident loader says the same, rather than TFDS's "file format is already set".
    from resnet_jax.data import load_dataset

    resident = stream_config("cifar10", tmp_path)
    resident.validation_size = 1
    with pytest.raises(RuntimeError, match=r"cannot be read as array_record.*tfrecord"):
        load_dataset(resident)


def test_not_prepared_without_tensorflow_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: False)

    def no_probe(*args, **kwargs):
        raise AssertionError("the network was probed")

    monkeypatch.setattr(tfds_source, "network_available", no_probe)
    t0 = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as e:
        stream.open_stream(stream_config("imagenet2012", tmp_path / "empty", image_size=32))
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "'imagenet2012' is not prepared in" in msg and str(tmp_path / "empty") in msg
    assert "resnet-jax[prepare]" in msg and "file_format='array_record'" in msg
    assert "--config.data.source=folder --config.data.data_dir=DIR" in msg


def test_train_cli_streams_tfds_and_evaluates_every_test_example(cifar10, tmp_path):
    from resnet_jax.cli import main

    data_dir, written = cifar10
    workdir = tmp_path / "run"
    code = main(["train", "--workdir", str(workdir), "--config", "quick",
                 "--config.data.name=cifar10", "--config.data.source=tfds",
                 "--config.data.pipeline=stream", f"--config.data.data_dir={data_dir}",
                 "--config.data.validation_size=4", "--config.data.stream_threads=1",
                 "--config.train.batch_size=8", "--config.train.eval_batch_size=8",
                 "--config.train.num_steps=3", "--config.train.log_every=1",
                 "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
                 "--config.optim.warmup_steps=0"])
    assert code == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["split"]: r for r in records if r.get("split") in ("validation", "test")}
    assert evals["test"]["step"] == 3 and evals["test"]["count"] == len(written["test"]) == 5
    assert evals["validation"]["count"] == 4
    assert [r["step"] for r in records if r.get("split") == "train"] == [1, 2, 3]
