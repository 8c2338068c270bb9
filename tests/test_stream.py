"""The streaming pipeline (resnet_jax/data/stream.py) and training on it.

Unit tests run on in-memory records whose pixels encode their index, so order and coverage can
be read off a batch; the training tests use a small ImageNet-layout folder of JPEGs of mixed
sizes that they write (3 wnid classes).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_process_env, tiny_config
from PIL import Image

from resnet_jax.cli import main
from resnet_jax.config import load_config
from resnet_jax.data import DataSpec, NormStats, image_ops
from resnet_jax.data import stream as streaming
from resnet_jax.data.records import ArrayRecords

WNIDS = ("n01440764", "n01443537", "n01484850")
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3


def write_imagenet_folder(root: Path, seed: int = 0) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, random sizes 40..119 px a side; a grayscale
    and a PNG file among them, as in the real ImageNet."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(40, 120, 2))
                # Class-dependent colour, so a few steps can learn something.
                base = np.zeros((h, w, 3), np.float32)
                base[..., c] = 160
                img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                if i == 1:
                    Image.fromarray(img).convert("L").save(folder / f"{wnid}_{i}.JPEG")
                elif i == 2:
                    Image.fromarray(img).save(folder / f"{wnid}_{i}.png")
                else:
                    Image.fromarray(img).save(folder / f"{wnid}_{i}.JPEG", quality=85)
    return root


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> Path:
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))


def index_splits(n: int = 20, n_test: int = 9) -> streaming.StreamSplits:
    """Splits of 4x4 grey images whose value is their index (train) or 100 + index (test)."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1))
    test = np.broadcast_to((100 + np.arange(n_test, dtype=np.uint8))[:, None, None, None],
                           (n_test, 4, 4, 1))
    spec = DataSpec("index", "bundled", n, (4, 4, 1), tuple(map(str, range(n))), n, 0, n_test)
    return streaming.StreamSplits(
        ArrayRecords(np.ascontiguousarray(images), np.arange(n), "train"),
        ArrayRecords(images[:0], np.zeros(0, np.int32), "val"),
        ArrayRecords(np.ascontiguousarray(test), np.arange(n_test) % 3, "test"),
        spec, NormStats(np.zeros(1, np.float32), np.ones(1, np.float32)), None)


def folder_config(data_dir: Path, *overrides: str):
    return load_config("imagenet_resnet50", ["data.source=folder", f"data.data_dir={data_dir}",
                                             "data.image_size=16", *overrides])


# --- order, determinism, sharding ---------------------------------------------------------
def test_each_epoch_covers_every_example_once_in_a_new_order():
    splits = index_splits()
    ds = streaming.train_dataset(splits, batch_size=4, seed=3, crop=False, flip=False)
    epochs = [np.concatenate([ds[s][0][:, 0, 0, 0] for s in range(5 * e, 5 * e + 5)])
              for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(20))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Labels travel with their images.
    assert np.array_equal(ds[7][1], ds[7][0][:, 0, 0, 0])
    other_seed = streaming.train_dataset(splits, batch_size=4, seed=4, crop=False, flip=False)
    assert not np.array_equal(other_seed[0][0], ds[0][0])


def test_batch_of_step_is_a_pure_function_of_seed_and_step():
    """The iterator yields ds[s] at step s; an iterator set to step k (a resumed run) continues
    with ds[k]; so does one built anew."""
    splits = index_splits()
    ds = streaming.train_dataset(splits, batch_size=4, seed=0, crop=False, flip=False)
    it = streaming.iterate(ds, num_threads=2)
    seen = [next(it) for _ in range(7)]
    for s, (x, y) in enumerate(seen):
        np.testing.assert_array_equal(x, ds[s][0])
        np.testing.assert_array_equal(y, ds[s][1])
    assert it.get_state()["next_index"] == 7
    again = streaming.iterate(streaming.train_dataset(splits, 4, 0, crop=False, flip=False), 1)
    again.set_state(it.get_state())
    np.testing.assert_array_equal(next(again)[0], next(it)[0])


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_their_rows_of_the_one_process_batch(imagenet_dir, processes):
    """Process p's local batch s is rows p*L..(p+1)*L-1 of the one-process batch s, bitwise,
    random-resized crops and flips included: each example's randomness is keyed by its global
    position, not by who reads it."""
    splits = streaming.open_stream(folder_config(imagenet_dir).data)
    whole = streaming.train_dataset(splits, batch_size=8, seed=1)
    parts = [streaming.train_dataset(splits, batch_size=8, seed=1, process_index=p,
                                     process_count=processes) for p in range(processes)]
    for s in (0, 1, 5):
        images = np.concatenate([part[s][0] for part in parts])
        labels = np.concatenate([part[s][1] for part in parts])
        assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, whole[s][0])
        np.testing.assert_array_equal(labels, whole[s][1])
    with pytest.raises(ValueError, match="batch size 8 does not divide over 3 processes"):
        streaming.train_dataset(splits, batch_size=8, seed=1, process_count=3)


def test_evaluation_reads_every_example_once_and_masks_the_padding():
    splits = index_splits()
    for processes in (1, 2):
        seen, masks = [], []
        for p in range(processes):
            ds, n = streaming.eval_dataset(splits, "test", batch_size=4, process_index=p,
                                           process_count=processes)
            assert n == 9 and len(ds) == 3  # ceil(9 / 4) global batches
            seen.append(np.stack([ds[b][0][:, 0, 0, 0] for b in range(len(ds))]))
            masks.append(np.stack([ds[b][2] for b in range(len(ds))]))
        # Global batch b = the processes' local batches b side by side.
        values = np.concatenate(seen, axis=1).ravel()
        mask = np.concatenate(masks, axis=1).ravel()
        assert mask.sum() == 9 and not mask[9:].any()
        np.testing.assert_array_equal(values[mask], 100 + np.arange(9))


# --- preprocessing --------------------------------------------------------------------------
def test_random_resized_crop_boxes_follow_the_inception_ranges():
    rng = np.random.default_rng(0)
    for width, height in ((500, 375), (64, 300), (1000, 40)):
        for _ in range(200):
            left, top, right, bottom = image_ops.random_resized_crop_box(width, height, rng)
            w, h = right - left, bottom - top
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            if (width, height) == (500, 375):  # never needs the fallback
                assert 0.08 * 0.97 <= w * h / (width * height) <= 1.0
                assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # A 25:1 strip: no crop in range fits within 10 tries; the centred fallback clamps the ratio.
    box = image_ops.random_resized_crop_box(1000, 40, np.random.default_rng(1))
    assert box[3] - box[1] == 40 and (box[2] - box[0]) / 40 == pytest.approx(4 / 3, rel=0.03)


def test_eval_crop_is_the_centre_of_the_shorter_side_resized_to_256_over_224():
    """Against the two-step reference (resize the shorter side, then crop the centre)."""
    rng = np.random.default_rng(0)
    array = np.clip(rng.normal(128, 30, (90, 150, 3)).cumsum(axis=1) / 10, 0, 255).astype(np.uint8)
    img = Image.fromarray(array)
    out = image_ops.resize_center_crop(img, 56)
    assert out.shape == (56, 56, 3)
    short = 64  # round(56 * 256 / 224)
    resized = np.asarray(img.resize((round(150 * short / 90), short), Image.Resampling.BILINEAR))
    left = (resized.shape[1] - 56) // 2
    reference = resized[4:60, left:left + 56]
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3.0
    # A mirrored image gives the mirrored crop: the crop is centred.
    mirrored = image_ops.resize_center_crop(Image.fromarray(array[:, ::-1]), 56)
    assert np.abs(mirrored.astype(int) - out[:, ::-1].astype(int)).max() <= 1


def test_images_of_another_size_without_image_size_are_named(imagenet_dir):
    config = folder_config(imagenet_dir, "data.name=image_folder", "data.normalization=none")
    config.data.image_size = None
    splits = streaming.open_stream(config.data)
    ds = streaming.train_dataset(splits, batch_size=8, seed=0)
    with pytest.raises(ValueError, match=r"\.(JPEG|png) is \d+x\d+ pixels.*image_size"):
        ds[0]


def test_open_stream_takes_classes_from_the_folders_and_estimates_stats(imagenet_dir):
    config = folder_config(imagenet_dir, "data.normalization=per_channel", "data.stats_images=5",
                           "data.validation_size=4")
    splits = streaming.open_stream(config.data)
    spec = splits.spec
    assert spec.class_names == WNIDS and spec.num_classes == 3
    assert spec.image_shape == (16, 16, 3)
    assert (spec.num_train, spec.num_validation, spec.num_test) == (20, 4, 9)
    # 5 sampled images: the class colours (160 in one channel) pull every channel's mean up.
    assert np.all(splits.stats.mean > 30) and np.all(splits.stats.std > 20)
    fixed = streaming.open_stream(folder_config(imagenet_dir).data)
    np.testing.assert_allclose(fixed.stats.mean, np.array([0.485, 0.456, 0.406]) * 255)


def test_an_uncompressed_tar_streams_by_offset(imagenet_dir, tmp_path):
    archive = tmp_path / "imagenet.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(imagenet_dir, arcname="imagenet")
    from_dir = streaming.open_stream(folder_config(imagenet_dir).data)
    from_tar = streaming.open_stream(folder_config(archive).data)
    assert from_tar.spec.class_names == from_dir.spec.class_names
    assert from_tar.train.tree._members  # indexed, and by (offset, size), not bytes
    assert all(isinstance(m, tuple) for m in from_tar.train.tree._members.values())
    a, b = (streaming.train_dataset(s, 8, seed=2)[3] for s in (from_dir, from_tar))
    np.testing.assert_array_equal(a[0], b[0])


def test_pipeline_choice():
    config = load_config("quick")
    assert streaming.resolve_pipeline(config.data) == "device"
    config.data.image_size = 24
    assert streaming.resolve_pipeline(config.data) == "stream"
    imagenet = load_config("imagenet_resnet50")
    imagenet.data.pipeline = "auto"
    assert streaming.resolve_pipeline(imagenet.data) == "stream"
    imagenet.data.pipeline = "device"
    with pytest.raises(ValueError, match="cannot hold 'imagenet2012'"):
        streaming.resolve_pipeline(imagenet.data)
    with pytest.raises(Exception, match="image_size=24 resizes images on the fly"):
        load_config("quick", ["data.image_size=24", "data.pipeline=device"])


# --- training -------------------------------------------------------------------------------
def _records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_imagenet_preset_trains_on_a_folder_with_its_classes(imagenet_dir, tmp_path):
    """The acceptance command with a depth override, as a user runs it (`resnet-jax train`, one
    CPU device): classes from the folder, every held-out image scored, the iterator's position
    in every checkpoint."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_jax.cli", "train", "--config", "imagenet_resnet50",
         "--workdir", str(workdir), "--config.data.source=folder",
         f"--config.data.data_dir={imagenet_dir}", "--config.model.depth=18",
         "--config.model.dtype=float32", "--config.data.image_size=32",
         "--config.train.batch_size=8", "--config.train.num_steps=4",
         "--config.train.log_every=2", "--config.train.eval_every=4",
         "--config.train.checkpoint_every=2", "--config.train.eval_batch_size=8",
         "--config.optim.warmup_steps=0"],
        env=cli_process_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done: step=4, test_error=" in proc.stdout
    spec = json.loads((workdir / "dataset.json").read_text())
    assert spec["num_classes"] == 3 and spec["class_names"] == list(WNIDS)
    assert spec["image_shape"] == [32, 32, 3] and spec["num_test"] == 3 * VAL_PER_CLASS
    versions = json.loads((workdir / "versions.json").read_text())
    assert versions["pipeline"] == "stream"
    test = [r for r in _records(workdir) if r["split"] == "test"]
    assert [(r["step"], r["count"]) for r in test] == [(4, 3 * VAL_PER_CLASS)]
    for step in (2, 4):
        state = json.loads(
            (workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text())
        assert state["next_index"] == step


def test_streamed_cifar_sample_equals_the_resident_augmentation(tmp_path):
    """Without image_size the device pads, crops and flips a streamed batch with the resident
    pipeline's key: a streamed run's first step equals the resident run's when both see the
    same batch, so only the order of examples differs between the pipelines."""
    import jax

    from resnet_jax.data import AugmentConfig, load_dataset, train_batch
    from resnet_jax.train.loop import make_mesh
    from resnet_jax.train.step import streamed_batch

    config = load_config("quick", ["data.validation_size=0"])
    ds = load_dataset(config.data)
    mesh = make_mesh(jax.devices()[:1])
    key = jax.random.key(0)
    aug = AugmentConfig.from_config(config.data)
    x_res, y_res = train_batch(ds.train_images, ds.train_labels, ds.stats, key, 3, 16, aug)
    from resnet_jax.data import batch_indices

    idx = np.asarray(batch_indices(key, 3, len(ds.train_images), 16))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x_str, y_str = streamed_batch(ds.train_images[idx], ds.train_labels[idx], ds.stats, key, 3,
                                  aug, sharding)
    np.testing.assert_array_equal(np.asarray(x_str), np.asarray(x_res))
    np.testing.assert_array_equal(np.asarray(y_str), np.asarray(y_res))
    assert math.isfinite(float(np.asarray(x_str).std())) and float(np.asarray(x_str).std()) > 0


def test_a_streamed_run_learns_like_the_resident_one_in_blocks_or_single_steps(tiny_run,
                                                                               tmp_path):
    """The session's resident tiny_run (20 steps of batch 64, 5 steps per host call) streamed
    instead: another example order, about the same test error. And the same streamed run at one
    step per call gives the 5-step blocks' losses and parameters (a lax.scan over 5 stacked
    batches, GPU/TPU's auto), to float rounding."""
    import jax

    from resnet_jax.train import restore_model, train_and_evaluate

    results, states, losses = {}, {}, {}
    for k in (5, 1):
        config = tiny_config(steps_per_call=k, eval_every=20, checkpoint_every=20)
        config.data.pipeline = "stream"
        config.data.stats_images = 1000
        config.train.eval_splits = ("test",) if k == 5 else ()
        results[k] = train_and_evaluate(config, tmp_path / f"k{k}", interactive=False)
        states[k] = restore_model(tmp_path / f"k{k}")[3]
        losses[k] = [r["loss"] for r in _records(tmp_path / f"k{k}") if r["split"] == "train"]
    resident = tiny_run[1]["test_error"]
    assert resident < 70 and results[5]["test_error"] < 70  # chance is 90%
    assert abs(results[5]["test_error"] - resident) < 15
    versions = json.loads((tmp_path / "k5" / "versions.json").read_text())
    assert versions["pipeline"] == "stream"
    assert int(states[1].step) == int(states[5].step) == 20 and len(losses[1]) == 4
    np.testing.assert_allclose(losses[1], losses[5], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(states[5].params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# --- a kill, and several processes ------------------------------------------------------------
def stream_run(data_dir: Path, num_steps: int = 8) -> list[str]:
    """Overrides of the imagenet_resnet50 preset for a seconds-long streamed run on the folder:
    ResNet-8 (CIFAR family: any input size) on 16 px random-resized crops, batch 8."""
    return [f"data.data_dir={data_dir}", "data.source=folder", "data.image_size=16",
            "model.family=cifar_resnet", "model.depth=8", "model.dtype=float32",
            "train.batch_size=8", f"train.num_steps={num_steps}", "train.log_every=1",
            f"train.eval_every={num_steps}", "train.checkpoint_every=2", "train.steps_per_call=1",
            "train.async_checkpoints=True", "train.eval_batch_size=8",
            "train.eval_splits=('test',)", "optim.warmup_steps=0", "data.stream_threads=2"]


def test_a_killed_streamed_run_resumes_bitwise_exact(imagenet_dir, tmp_path):
    """SIGKILL after step 5 (checkpoint 4 committed, async saves on): the rerun restores the
    input iterator at batch 4 and ends bitwise equal to an uninterrupted run."""
    from test_faults import TrainProcess, assert_trees_equal, committed_steps, subprocess_env

    from resnet_jax.train import restore_model

    overrides = stream_run(imagenet_dir)
    cache = tmp_path / "xla_cache"

    def env(**extra: str) -> dict[str, str]:
        return subprocess_env(cache, 2, RESNET_JAX_TEST_PRESET="imagenet_resnet50", **extra)

    reference = TrainProcess(tmp_path / "reference", overrides, env())
    workdir = tmp_path / "killed"
    killed = TrainProcess(workdir, overrides,
                          env(RESNET_JAX_TEST_LOG_WAIT=f"5:{tmp_path / 'never'}"))
    killed.wait_for("MARK waiting 5")
    deadline = time.monotonic() + 60  # the async save of step 4 commits in the background
    while 4 not in committed_steps(workdir / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.kill()
    assert committed_steps(workdir / "checkpoints") == [2, 4]
    saved = json.loads((workdir / "checkpoints/4/data/process_0-of-1.json").read_text())
    assert saved["next_index"] == 4

    resumed = TrainProcess(workdir, overrides, env())
    assert resumed.wait_for("MARK resumed") == "MARK resumed 4"
    resumed.wait_for("MARK done 8")
    reference.wait_for("MARK done 8")
    assert resumed.proc.wait() == 0 and reference.proc.wait() == 0
    # The model alone (restore_run would load the data set whole, which a stream never does).
    assert_trees_equal(restore_model(workdir)[3], restore_model(tmp_path / "reference")[3])
    losses = {r["step"]: r["loss"] for r in _records(workdir) if r["split"] == "train"}
    ref_losses = {r["step"]: r["loss"] for r in _records(tmp_path / "reference")
                  if r["split"] == "train"}
    assert losses == ref_losses and sorted(losses) == list(range(1, 9))


def test_auto_streams_a_split_that_does_not_fit_and_device_refuses_it(tmp_path, monkeypatch,
                                                                       capsys):
    """A device reporting 1 MB: the bundled sample (5,000 x 28 x 28 bytes = 3.9 MB) does not fit
    in half of it, so "auto" streams it (and says why) and "device" is refused, naming both."""
    monkeypatch.setattr("resnet_jax.train.inputs.device_memory_bytes", lambda: 2**20)
    common = ["--config", "quick", "--config.train.num_steps=2", "--config.train.log_every=1",
              "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
              "--config.train.batch_size=64", "--config.train.eval_splits=()"]
    assert main(["train", "--workdir", str(tmp_path / "auto"), *common]) == 0
    out = capsys.readouterr()
    assert "Streaming the input: the training split (0.00 GiB" in out.out + out.err
    versions = json.loads((tmp_path / "auto" / "versions.json").read_text())
    assert versions["pipeline"] == "stream"
    assert main(["train", "--workdir", str(tmp_path / "device"), *common,
                 "--config.data.pipeline=device"]) == 2
    err = capsys.readouterr().err
    assert "does not fit comfortably in one device's 0.00 GiB" in err
    assert "config.data.pipeline='stream'" in err


def test_channels_do_not_hang_on_the_first_file(imagenet_dir, tmp_path):
    """ImageNet is RGB even when its first file is grayscale; an image folder is RGB when any
    sampled image is in colour, grayscale when none is."""
    data = tmp_path / "imagenet"
    shutil.copytree(imagenet_dir, data)
    first = data / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    Image.open(first).convert("L").save(first)
    assert streaming.open_stream(folder_config(data).data).spec.image_shape == (16, 16, 3)
    as_folder = folder_config(data, "data.name=image_folder", "data.normalization=none")
    assert streaming.open_stream(as_folder.data).spec.image_shape == (16, 16, 3)
    for path in (data / "train").rglob("*.*"):
        Image.open(path).convert("L").save(path, format="PNG" if path.suffix == ".png" else None)
    assert streaming.open_stream(as_folder.data).spec.image_shape == (16, 16, 1)


def test_evaluation_decodes_in_full_so_predict_sees_the_same_pixels():
    """Training crops of large JPEGs may be decoded at a reduced scale; the evaluation crop is
    always the full decode's (what predict computes), bitwise."""
    import io

    from resnet_jax.data.folders import open_image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 600)[None, :, None] * np.ones((560, 1, 3))
    photo = np.clip(ramp + rng.normal(0, 20, (560, 600, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    records = [("big.jpg", buf.getvalue(), 0)]
    spec = DataSpec("image_folder", "folder", 1, (64, 64, 3), ("a",), 1, 0, 1)
    image, label, mask = streaming.EvalImage(records, spec, 64)(0)
    full = image_ops.resize_center_crop(open_image(buf.getvalue(), "big.jpg"), 64)
    np.testing.assert_array_equal(image, full)
    # The draft path exists and would differ: 600x560 at a 64 px crop decodes at 1/4 or 1/8.
    assert not np.array_equal(image_ops.decode_resize_center_crop(buf.getvalue(), "big.jpg", 64),
                              full)
