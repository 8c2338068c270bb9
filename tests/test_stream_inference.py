"""Evaluate, predict and export for a run trained with the streaming pipeline on an
ImageNet-layout folder of images of any size (config.data.image_size)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import resnet_jax
from resnet_jax.cli import main
from resnet_jax.config import load_run_config
from resnet_jax.data import image_ops, stream
from resnet_jax.inference import CenterCrop, read_export, to_model_array
from resnet_jax.inference.evaluate import evaluate_run
from resnet_jax.rundir.spec import read_spec

CLASSES = ("n01440764", "n01443537", "n01484850")
SIZE = 16  # config.data.image_size: shorter side resized to 18, centre 16 x 16 crop
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS, VALIDATION = 6, 5, 4


def _write_image(path, rng, label, mode="RGB"):
    w, h = (int(v) for v in rng.integers(40, 121, 2))
    pixels = rng.integers(0, 80, (h, w, 3)) + np.eye(3, dtype=np.int64)[label] * 170
    img = Image.fromarray(pixels.astype(np.uint8))
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":  # transparent left half: composited over white, as in the dataset
        alpha = np.full((h, w), 255, np.uint8)
        alpha[:, : w // 2] = 0
        img.putalpha(Image.fromarray(alpha))
    img.save(path, **({"quality": 90} if path.suffix == ".JPEG" else {}))


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory):
    """A 2-step run of the imagenet_resnet50 preset (made tiny) on a generated folder."""
    root = tmp_path_factory.mktemp("stream_infer")
    data, rng = root / "imagenet", np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", HELD_OUT_PER_CLASS)):
        for label, wnid in enumerate(CLASSES):
            (data / split / wnid).mkdir(parents=True)
            for i in range(count):
                _write_image(data / split / wnid / f"{i}.JPEG", rng, label)
    # A grayscale JPEG and a transparent PNG among the held-out images.
    _write_image(data / "val" / CLASSES[0] / "gray.JPEG", rng, 0, "L")
    _write_image(data / "val" / CLASSES[1] / "alpha.png", rng, 1, "RGBA")
    # A wide image whose resize and centre crop differs from a plain resize to 16 x 16.
    Image.fromarray(np.tile(np.linspace(0, 255, 110).astype(np.uint8)[None, :, None],
                            (44, 1, 3))).save(data / "val" / CLASSES[2] / "wide.JPEG")
    workdir = root / "run"
    assert main([
        "train", "--config", "imagenet_resnet50", "--workdir", str(workdir),
        "--config.data.source=folder", f"--config.data.data_dir={data}",
        f"--config.data.image_size={SIZE}", f"--config.data.validation_size={VALIDATION}",
        "--config.data.stream_threads=2",
        # The cheapest network: the inference path does not depend on the family.
        "--config.model.family=cifar_resnet", "--config.model.depth=8",
        "--config.model.dtype=float32", "--config.train.batch_size=8",
        "--config.train.num_steps=2", "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2", "--config.train.eval_batch_size=8",
        "--config.train.log_every=1", "--config.optim.warmup_steps=0",
        "--config.train.async_checkpoints=False",
    ]) == 0
    return workdir, data


def _held_out_files(data):
    files = sorted(p for p in (data / "val").rglob("*") if p.is_file())
    return files, np.array([CLASSES.index(p.parent.name) for p in files])


def _predicted_probabilities(capsys, workdir, files):
    """`resnet-jax predict --json` over `files`: [N, classes] probabilities in class order."""
    capsys.readouterr()
    assert main(["predict", "--workdir", str(workdir), "--json", "--top-k", "3",
                 "--batch-size", "8", *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == list(map(str, files))
    return np.array([[dict(r["top"])[c] for c in CLASSES] for r in rows])


def _errors(probs, labels):
    """Top-1 error (%), computed as the eval step does, and the confusion matrix."""
    predicted = probs.argmax(-1)
    cm = np.zeros((len(CLASSES),) * 2, np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return 100.0 * float(np.sum(predicted != labels)) / len(labels), cm


def test_evaluate_counts_every_image_and_agrees_with_predict(streamed_run, capsys, tmp_path):
    workdir, data = streamed_run
    files, labels = _held_out_files(data)
    s = evaluate_run(workdir, split="test", out_dir=tmp_path)
    logged = s["logged"]
    # 18 images in batches of 8: the last batch has 6 of padding, masked out.
    assert s["count"] == len(files) == 3 * HELD_OUT_PER_CLASS + 3 == logged["count"]
    assert s["error"] == logged["error"] and abs(s["loss"] - logged["loss"]) <= 1e-5
    probs = _predicted_probabilities(capsys, workdir, files)
    error, cm = _errors(probs, labels)
    assert s["error"] == error  # same float expression of the same counts: exactly equal
    assert s["confusion_matrix"] == cm.tolist()
    loss = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
    assert s["loss"] == pytest.approx(loss, rel=1e-5)  # float32 sums in another order


def test_evaluate_validation_split_is_carved_from_train(streamed_run, capsys, tmp_path):
    workdir, data = streamed_run
    splits = stream.open_stream(load_run_config(workdir).data, stats=read_spec(workdir)[1])
    records = [splits.validation[i] for i in range(len(splits.validation))]
    files = [name for name, _, _ in records]
    labels = np.array([label for _, _, label in records])
    assert all(f.startswith(str(data / "train")) for f in files)
    s = evaluate_run(workdir, split="validation", out_dir=tmp_path)
    assert s["count"] == len(files) == VALIDATION
    error, cm = _errors(_predicted_probabilities(capsys, workdir, files), labels)
    assert s["error"] == error and s["confusion_matrix"] == cm.tolist()


def test_predict_converts_images_exactly_as_evaluation_did(streamed_run):
    workdir, data = streamed_run
    config, stats = load_run_config(workdir), read_spec(workdir)[1]
    clf = resnet_jax.load(workdir, batch_size=8)
    assert clf.center_crop == CenterCrop(SIZE, 18) and clf.image_shape == (SIZE, SIZE, 3)
    # The pixels the stream's evaluation fed the model, in record order, equal predict's.
    splits = stream.open_stream(config.data, stats=stats)
    ds, n = stream.eval_dataset(splits, "test", 8)
    fed = np.concatenate([images[mask] for images, _, mask in stream.iterate(ds, 1)])
    files = [splits.test[i][0] for i in range(n)]
    np.testing.assert_array_equal(clf.preprocess(files), fed)
    # A non-square image: the model applied to its resize + centre crop, bit for bit.
    wide = data / "val" / CLASSES[2] / "wide.JPEG"
    with Image.open(wide) as img:
        crop = image_ops.resize_center_crop(img.convert("RGB"), SIZE)
        plain = to_model_array(img, (SIZE, SIZE, 3))
    assert not np.array_equal(crop, plain)  # so the comparison below can tell them apart
    np.testing.assert_array_equal(clf([wide]), clf(crop[None]))
    assert not np.array_equal(clf([wide]), clf(plain[None]))


def test_export_then_load_without_the_data_gives_identical_probabilities(streamed_run,
                                                                           tmp_path):
    workdir, data = streamed_run
    images = tmp_path / "images"
    shutil.copytree(data / "val", images)
    files = sorted(p for p in images.rglob("*") if p.is_file())
    clf = resnet_jax.load(workdir, batch_size=8)
    expected = clf(files)
    out = tmp_path / "model.safetensors"
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    meta, _ = read_export(out)
    assert meta["center_crop"] == {"size": SIZE, "resize": 18} and meta["version"] == 2
    moved = data.with_name("moved")
    data.rename(moved)  # the training data is gone
    try:
        exported = resnet_jax.load(out, batch_size=8)
        assert exported.center_crop == clf.center_crop
        np.testing.assert_array_equal(exported(files), expected)
        np.testing.assert_array_equal(resnet_jax.load(workdir, batch_size=8)(files), expected)
    finally:
        moved.rename(data)


@pytest.mark.parametrize("split", ["train", "val"])
def test_evaluate_refuses_data_whose_classes_changed(streamed_run, capsys, split):
    """A class the run never saw: in train/ it changes the validation split's labels, in val/
    the test split's; scoring the affected split is refused, naming the folder."""
    workdir, data = streamed_run
    extra = data / split / "n99999999"
    extra.mkdir()
    shutil.copy(next((data / "train" / CLASSES[0]).iterdir()), extra / "0.JPEG")
    scored = "validation" if split == "train" else "test"
    try:
        assert main(["evaluate", "--workdir", str(workdir), "--split", scored,
                     "--out", str(workdir / "x")]) == 2
    finally:
        shutil.rmtree(extra)
    err = capsys.readouterr().err
    if split == "train":
        assert f"has classes {[*CLASSES, 'n99999999']}" in err
        assert f"trained on classes {list(CLASSES)}" in err
    else:
        assert "folder val/n99999999/ is not a class of the trained run" in err
        assert f"Expected class folders: {', '.join(CLASSES)}" in err


def test_scoring_the_test_split_needs_only_its_folder(streamed_run, capsys, tmp_path):
    """train/ moved away: the test split is still scored (every image), as for a resident run."""
    workdir, data = streamed_run
    before = evaluate_run(workdir, split="test", out_dir=tmp_path / "a")
    moved = data.parent / "train_elsewhere"
    (data / "train").rename(moved)
    try:
        after = evaluate_run(workdir, split="test", out_dir=tmp_path / "b")
    finally:
        moved.rename(data / "train")
    assert after["count"] == before["count"] == 3 * HELD_OUT_PER_CLASS + 3
    assert after["error"] == before["error"] and after["loss"] == before["loss"]


def test_a_run_that_auto_streamed_for_lack_of_device_memory_is_scored_streamed(tmp_path):
    from resnet_jax.config import default_config
    from resnet_jax.inference.evaluate import trained_streamed

    config = default_config()  # cifar10, pipeline "auto", no image_size: resident by config
    assert not trained_streamed(tmp_path, config)  # no versions.json (an older run)
    for pipeline, streamed in (("device", False), ("stream", True)):
        (tmp_path / "versions.json").write_text(json.dumps({"pipeline": pipeline}))
        assert trained_streamed(tmp_path, config) is streamed
    (tmp_path / "versions.json").write_text('{"pipe')  # damaged: the config decides
    assert not trained_streamed(tmp_path, config)
    config.data.image_size = 32
    assert trained_streamed(tmp_path, config)
