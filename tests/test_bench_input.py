"""The bench's input-pipeline rows: they time the library's stream, and their arithmetic."""

import threading
import types

import numpy as np
import pytest

from resnet_jax.bench import input_pipeline
from resnet_jax.bench.cli import format_input_pipeline, parse_args
from resnet_jax.bench.input_pipeline import bench_input, cores_needed, feeding, write_jpeg_folder
from resnet_jax.data import image_ops


def test_cores_needed_is_the_train_rate_over_the_rate_per_core():
    assert cores_needed(3000.0, 250.0) == pytest.approx(12.0)
    assert cores_needed(100.0, 400.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="per core must be > 0"):
        cores_needed(3000.0, 0.0)


def test_feeding_covers_the_streamed_train_rows_only():
    rows = [{"model": "resnet50", "dtype": "bfloat16", "step": "train", "streamed": True,
             "images_per_s": 3000.0},
            {"model": "resnet50", "dtype": "bfloat16", "step": "eval", "streamed": True,
             "images_per_s": 9000.0},
            {"model": "resnet20", "dtype": "float32", "step": "train", "streamed": False,
             "images_per_s": 20000.0}]
    out = feeding(rows, 250.0)
    assert [(f["model"], f["cores_needed"]) for f in out] == [("resnet50", pytest.approx(12.0))]


def test_input_rows_time_the_library_stream_with_a_clock_of_known_ticks(tmp_path, monkeypatch):
    written = write_jpeg_folder(tmp_path, 12, classes=2, sides=(40, 60))
    assert sorted(p.parent.name for p in (tmp_path / "train").glob("*/*.JPEG")) == (
        ["class_0"] * 6 + ["class_1"] * 6)
    assert written["images"] == 12 and written["mean_file_bytes"] > 0
    # Every image of every window goes through the training transform's crop from bytes.
    sizes, lock = [], threading.Lock()
    real = image_ops.decode_random_resized_crop

    def counted(data, name, rng, size):
        with lock:
            sizes.append(size)
        return real(data, name, rng, size)

    monkeypatch.setattr(image_ops, "decode_random_resized_crop", counted)
    # A warm-up window and 2 timed ones, each 1 thread (1 batch) then 2 threads (2 batches):
    # timed windows last 0.5 and 1.0 s (1 thread), 0.5 and 0.3 s (2 threads, 2 batches), and
    # use 0.4, 0.8, 0.8, 0.4 s of CPU time.
    ticks = iter([0, 9, 10, 19,  20, 20.5, 30, 30.5,  40, 41.0, 50, 50.3])
    cpu = iter([0, 1, 2, 3,  4, 4.4, 5, 5.8,  6, 6.8, 7, 7.4])
    monkeypatch.setattr(input_pipeline, "time", types.SimpleNamespace(
        perf_counter=lambda: next(ticks), process_time=lambda: next(cpu)))
    report = bench_input(str(tmp_path), batch_size=4, image_size=16, threads=2, windows=2,
                         batches_per_thread=1)
    assert next(ticks, None) is None and next(cpu, None) is None
    assert sizes == [16] * (3 * (1 + 2) * 4)  # 3 windows x 3 batches x 4 images
    one, two = report["rows"]
    assert (one["threads"], two["threads"]) == (1, 2)
    np.testing.assert_allclose(one["step_s_windows"], [0.5, 1.0])
    np.testing.assert_allclose(two["step_s_windows"], [0.25, 0.15])
    assert one["images_per_s"] == pytest.approx(4 / 0.75)  # median 0.75 s per batch
    assert two["images_per_s"] == pytest.approx(20.0)  # median 0.2 s per batch of 4
    assert two["images_per_s_per_thread"] == pytest.approx(10.0)
    np.testing.assert_allclose(two["cpu_s_windows"], [0.4, 0.2])  # per batch
    assert one["images_per_cpu_s"] == pytest.approx(4 / 0.6)  # median 0.6 CPU-s per batch
    # Per core: 4 images per 0.3 CPU-s (median) at 2 threads.
    assert report["images_per_s_per_core"] == pytest.approx(4 / 0.3)
    assert report["num_train"] == 12


def test_report_states_the_cores_needed_to_feed_the_gpu():
    report = {"data_dir": "/tmp/x", "num_train": 256, "image_size": 224,
              "transform": "random-resized crop + flip", "cpu_count": 16,
              "load_average": [0.5, 0.7], "images_per_s_per_core": 250.0,
              "generated": {"images": 256, "sides": [300, 500], "quality": 90,
                            "mean_file_bytes": 80 * 1024},
              "rows": [{"threads": 1, "batch_size": 128, "images_per_s": 260.0,
                        "images_per_s_min": 250.0, "images_per_s_max": 270.0,
                        "images_per_s_per_thread": 260.0, "images_per_cpu_s": 262.0},
                       {"threads": 16, "batch_size": 128, "images_per_s": 4000.0,
                        "images_per_s_min": 3900.0, "images_per_s_max": 4100.0,
                        "images_per_s_per_thread": 250.0, "images_per_cpu_s": 250.0}],
              "feeding": [{"model": "resnet50", "dtype": "bfloat16",
                           "train_images_per_s": 3000.0, "cores_needed": 12.0}]}
    lines = format_input_pipeline(report)
    assert "256 generated JPEGs, 300-500 px, q90, mean 80 KB" in lines[1]
    assert lines[4].split() == ["16", "4000", "[3900-4100]", "250", "250"]
    assert lines[-1] == ("CPU cores needed to feed it: resnet50 bfloat16 train 3000 img/s / "
                         "250 img/s per core = 12.0 cores")
    assert format_input_pipeline(None) == []


def test_input_dir_must_be_a_class_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--input-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "--input-dir" in capsys.readouterr().err
    (tmp_path / "train" / "a").mkdir(parents=True)
    assert parse_args(["--input-dir", str(tmp_path)]).input_dir == str(tmp_path)


def test_imagenet_models_time_the_streamed_step_at_the_image_size():
    from resnet_jax.bench.runner import (
        BenchConfig,
        LibraryStep,
        _eval_batch,
        step_config,
        streams,
        synthetic_data,
    )
    from resnet_jax.data.preprocess import imagenet_stats
    from resnet_jax.train.loop import make_mesh

    assert streams("resnet50") and streams("resnet18") and not streams("resnet20")
    cfg = BenchConfig(models=["resnet50"], compile_only_models=[], batch_size=8, image_size=32)
    config = step_config(cfg, "resnet50", "bfloat16", scan_blocks=False, remat=False)
    assert (config.model.family, config.model.depth, config.model.dtype) == (
        "imagenet_resnet", 50, "bfloat16")
    assert (config.data.image_size, config.train.batch_size, config.optim.schedule) == (
        32, 8, "cosine")  # the imagenet_resnet50 preset with the bench's overrides
    mesh = make_mesh()
    spec, data = synthetic_data(cfg, True, mesh, 64)
    assert (spec.num_classes, spec.image_shape) == (1000, (32, 32, 3))
    images, labels, stats = data
    assert (images.shape, images.dtype, labels.shape) == ((1, 8, 32, 32, 3), np.uint8, (1, 8))
    np.testing.assert_allclose(np.asarray(stats.mean), imagenet_stats(3).mean)
    lib = LibraryStep(config, mesh, None, data, None, None, "plain", streamed=True)
    x, y, mask, _ = _eval_batch(lib, 8)
    assert (x.shape, y.shape, mask.shape) == ((8, 32, 32, 3), (8,), (8,))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(images[0]))
