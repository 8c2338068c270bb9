"""Evaluate, predict, export and the `resnet_jax.load` API, on the shared tiny ResNet-8 run."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import resnet_jax
from resnet_jax.cli import main
from resnet_jax.inference import ImageLoadError, load_image, read_export, to_model_array
from resnet_jax.inference.evaluate import evaluate_run


def _logged(workdir, step, split):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["step"] == step and r["split"] == split][-1]


@pytest.fixture(scope="module")
def clf(tiny_run):
    return resnet_jax.load(tiny_run[0], step=20)


# --- image conversion (no model) ---------------------------------------------------------------


def test_conversion_to_training_shape_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    # RGB -> 1 channel is Pillow's own luma conversion.
    want = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
    np.testing.assert_array_equal(to_model_array(Image.fromarray(rgb), (28, 28, 1)), want)
    # Grayscale -> 3 channels replicates the gray value.
    gray = rgb[..., 0]
    out = to_model_array(Image.fromarray(gray), (28, 28, 3))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
    # RGBA: transparent pixels become white, opaque ones keep their value, half alpha blends.
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[0, :, 3], rgba[1, :, 3], rgba[2:, :, 3] = 0, 128, 255
    out = to_model_array(Image.fromarray(rgba, "RGBA"), (28, 28, 1))[..., 0]
    assert (out[0] == 255).all() and (out[2:] == 100).all()
    assert abs(int(out[1, 0]) - round(100 * 128 / 255 + 255 * 127 / 255)) <= 1
    # Resized to the training H x W; a constant image stays constant.
    big = Image.fromarray(np.full((64, 48, 3), 77, np.uint8))
    out = to_model_array(big, (28, 28, 1))
    assert out.shape == (28, 28, 1) and (out == 77).all()
    # 16-bit grayscale PNG: rescaled to 8 bits, not clipped at 255.
    wide = np.full((28, 28), 65535, np.uint16)
    wide[:14] = 257 * 40
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", (28, 28, 1))[..., 0]
    assert (out[:14] == 40).all() and (out[14:] == 255).all()


def test_bad_files_raise_naming_the_file(tmp_path):
    (tmp_path / "text.png").write_text("not a png at all")
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])  # truncated mid-data
    for name, phrase in [("missing.png", "no such file"), ("text.png", "Pillow can read"),
                         ("cut.png", "cannot decode")]:
        with pytest.raises(ImageLoadError, match=phrase) as e:
            load_image(tmp_path / name, (28, 28, 1))
        assert str(tmp_path / name) in str(e.value)


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_reproduces_the_training_log(tiny_run, tmp_path):
    workdir, _ = tiny_run
    s = evaluate_run(workdir, step=20, split="test", out_dir=tmp_path)
    logged = _logged(workdir, 20, "test")
    assert s["step"] == 20 and s["count"] == logged["count"] == 1000
    assert s["error"] == logged["error"] and s["top5_error"] == logged["top5_error"]
    assert abs(s["loss"] - logged["loss"]) <= 1e-5
    cm = np.asarray(s["confusion_matrix"])
    assert cm.sum() == 1000 and cm.sum(axis=1).tolist() == [c["count"] for c in s["per_class"]]
    assert 100.0 * (1000 - np.trace(cm)) / 1000 == pytest.approx(s["error"], abs=1e-9)
    accs = [c["accuracy"] for c in s["per_class"]]
    np.testing.assert_allclose(accs, 100.0 * np.diag(cm) / cm.sum(axis=1))
    assert [c["name"] for c in s["per_class"]][:2] == ["T-shirt/top", "Trouser"]
    assert json.loads((tmp_path / "test_step20.json").read_text())["error"] == s["error"]
    with Image.open(tmp_path / "test_step20_confusion.png") as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_evaluate_cli_validation_split(tiny_run, capsys):
    workdir, _ = tiny_run
    assert main(["evaluate", "--workdir", str(workdir), "--step", "20",
                 "--split", "validation"]) == 0
    out = capsys.readouterr().out
    logged = _logged(workdir, 20, "validation")
    summary = json.loads((workdir / "eval" / "validation_step20.json").read_text())
    assert summary["error"] == logged["error"] and summary["count"] == 500
    assert abs(summary["loss"] - logged["loss"]) <= 1e-5
    assert f"top-1 error {logged['error']:.2f}%" in out and "(identical)" in out
    assert "Ankle boot" in out and (workdir / "eval" / "validation_step20_confusion.png").exists()


def test_evaluate_with_a_padded_last_batch_matches_an_independent_count(tiny_run, clf,
                                                                        sample_dataset, tmp_path):
    workdir, _ = tiny_run
    images, labels = sample_dataset.validation_images, sample_dataset.validation_labels
    batch = json.loads((workdir / "config.json").read_text())["train"]["eval_batch_size"]
    assert (len(images), batch) == (500, 200)  # batches of 200, 200 and 100 + 100 padding
    # Padding is a zero image labelled 0; the model does not predict 0 for it, so padding that
    # leaked into the sums would count as wrong (and add its loss).
    assert clf.logits(np.zeros((1, *images.shape[1:]), np.uint8))[0].argmax() != 0
    s = evaluate_run(workdir, step=20, split="validation", out_dir=tmp_path)
    # The same counts from the classifier's logits (its own forward pass and batching), in numpy.
    logits = clf.logits(images).astype(np.float64)
    predicted = logits.argmax(-1)
    wrong1 = int(np.sum(predicted != labels))
    wrong5 = int(np.sum(~np.any(np.argsort(-logits, -1)[:, :5] == labels[:, None], -1)))
    top = logits.max(-1)
    logsumexp = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    loss = float(np.mean(logsumexp - logits[np.arange(len(labels)), labels]))
    assert s["count"] == 500
    assert s["error"] == pytest.approx(100.0 * wrong1 / 500, abs=1e-9)
    assert s["top5_error"] == pytest.approx(100.0 * wrong5 / 500, abs=1e-9)
    assert s["loss"] == pytest.approx(loss, rel=1e-5)
    cm = np.zeros((10, 10), int)
    np.add.at(cm, (labels, predicted), 1)
    np.testing.assert_array_equal(s["confusion_matrix"], cm)


# --- classifier API and predict ----------------------------------------------------------------


def test_classifier_reproduces_logged_test_error(tiny_run, clf, sample_dataset):
    ds = sample_dataset
    assert clf.step == 20 and clf.class_names == ds.spec.class_names
    probs = clf(ds.test_images)
    assert probs.shape == (1000, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    error = 100.0 * int(np.sum(np.argmax(probs, -1) != ds.test_labels)) / 1000
    assert error == _logged(tiny_run[0], 20, "test")["error"]
    np.testing.assert_array_equal(np.argmax(clf.logits(ds.test_images[:7]), -1),
                                  np.argmax(probs[:7], -1))


def test_predict_cli_on_pngs(tiny_run, clf, sample_dataset, tmp_path, capsys):
    x = sample_dataset.test_images[:3]  # [3, 28, 28, 1]
    gray, rgb, rgba = x[0, ..., 0], np.repeat(x[1], 3, -1), np.repeat(x[2], 3, -1)
    Image.fromarray(gray).save(tmp_path / "a_gray.png")
    Image.fromarray(rgb).save(tmp_path / "b_rgb.png")
    alpha = np.full((28, 28, 1), 255, np.uint8)  # opaque: the pixels must come back unchanged
    Image.fromarray(np.concatenate([rgba, alpha], -1), "RGBA").save(tmp_path / "c_rgba.png")
    (tmp_path / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x01" * 40)
    rc = main(["predict", "--workdir", str(tiny_run[0]), "--top-k", "3", "--json",
               str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1  # one file failed; the others were still classified
    assert str(tmp_path / "b_corrupt.png") in captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["file"] for r in lines] == [str(tmp_path / n)
                                          for n in ("a_gray.png", "b_rgb.png", "c_rgba.png")]
    want = clf(x)  # the same pixels, straight from the dataset
    for r, p in zip(lines, want, strict=True):
        order = np.argsort(-p, kind="stable")[:3]
        assert [name for name, _ in r["top"]] == [clf.class_names[i] for i in order]
        np.testing.assert_allclose([pr for _, pr in r["top"]], p[order], rtol=1e-6)


def test_api_predict_bad_file_does_not_stop_others(clf, sample_dataset, tmp_path):
    x = sample_dataset.test_images[5]
    Image.fromarray(x[..., 0]).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("nope")
    preds = clf.predict([tmp_path / "ok.png", tmp_path / "bad.png", Image.fromarray(x[..., 0])],
                        top_k=2)
    assert preds[1].error is not None and str(tmp_path / "bad.png") in preds[1].error
    assert preds[0].top == preds[2].top and len(preds[0].top) == 2
    assert preds[0].label == clf.class_names[int(np.argmax(clf(x[None])[0]))]


def test_best_is_an_older_checkpoint_in_load_evaluate_and_predict(tiny_run, sample_dataset,
                                                                   tmp_path, capsys):
    from resnet_jax.train import Checkpointer, restore_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    val = {s: _logged(run, s, "validation")["error"] for s in (10, 20)}
    best, worst = sorted(val, key=val.get)
    # The newest checkpoint (30) holds the worse step's weights with a worse validation error
    # than both, so "the newest" and "the best" differ in step and in predictions.
    state = restore_run(run, step=worst)[2]
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(state.replace(step=30), {"validation_error": val[worst] + 1})
    ckpt.close()
    assert resnet_jax.load(run, best=True).step == best
    assert main(["evaluate", "--workdir", str(run), "--best", "--split", "validation",
                 "--out", str(tmp_path / "eval")]) == 0
    assert f"step {best}, validation split" in capsys.readouterr().out
    Image.fromarray(sample_dataset.test_images[0][..., 0]).save(tmp_path / "x.png")
    want = resnet_jax.load(run, step=best)(sample_dataset.test_images[:1])[0]
    assert main(["predict", "--workdir", str(run), "--best", "--json", "--top-k", "1",
                 str(tmp_path / "x.png")]) == 0
    top = json.loads(capsys.readouterr().out)["top"][0]
    assert top == [sample_dataset.spec.class_names[want.argmax()], pytest.approx(want.max(),
                                                                                  rel=1e-6)]


# --- export -------------------------------------------------------------------------------------


def test_export_round_trip_gives_identical_logits(tiny_run, clf, sample_dataset, tmp_path):
    out = tmp_path / "model.safetensors"
    assert main(["export", "--workdir", str(tiny_run[0]), "--step", "20",
                 "--out", str(out)]) == 0
    meta, tensors = read_export(out)
    assert meta["class_names"] == list(clf.class_names) and meta["image_shape"] == [28, 28, 1]
    assert meta["model"]["depth"] == 8 and meta["step"] == 20
    # Without config.data.image_size: no centre crop, and a file older readers accept.
    assert "center_crop" not in meta and meta["version"] == 1
    assert all(k.split("/")[0] in ("params", "batch_stats", "normalization") for k in tensors)
    np.testing.assert_array_equal(tensors["normalization/mean"], sample_dataset.stats.mean)
    exported = resnet_jax.load(out)
    assert exported.center_crop is None and clf.center_crop is None
    images = sample_dataset.test_images[:300]
    np.testing.assert_array_equal(exported.logits(images), clf.logits(images))
    with pytest.raises(ValueError, match="run directories"):
        resnet_jax.load(out, step=10)


def test_export_rejects_foreign_safetensors(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2,), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors.*resnet-jax export"):
        resnet_jax.load(tmp_path / "other.safetensors")
    save_file({"w": np.zeros((2,), np.float32)}, str(tmp_path / "cut.safetensors"),
              metadata={"resnet_jax": '{"format": "resnet_jax.exp'})
    with pytest.raises(ValueError, match="cut.safetensors: its resnet_jax metadata is not valid"):
        resnet_jax.load(tmp_path / "cut.safetensors")


# --- runs without checkpoints -------------------------------------------------------------------


def test_missing_run_or_checkpoint_is_a_clear_error(tiny_run, tmp_path, capsys):
    empty = tmp_path / "no_ckpt_run"
    empty.mkdir()
    shutil.copy(tiny_run[0] / "config.json", empty / "config.json")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
    for cmd in (["predict", "--workdir", str(empty), str(tmp_path / "x.png")],
                ["evaluate", "--workdir", str(empty)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert str(empty) in err and "checkpoint" in err.lower() and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resnet_jax.load(tmp_path / "nowhere")


# --- files that are not what they should be ------------------------------------------------------


def test_export_to_a_directory_an_unwritable_place_or_a_full_disk_leaves_nothing(
        tiny_run, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import resnet_jax.inference.export as export

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a model")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "models").mkdir()
    for out, why, patch in [
            (tmp_path / "models", "it is a directory", None),
            (tmp_path / "a_file" / "m.safetensors", f"{tmp_path / 'a_file'} is a file", None),
            (tmp_path / "m.safetensors", "the disk is full", full_disk)]:
        if patch is not None:
            monkeypatch.setattr(export, "save_file", patch)
        before = sorted(tmp_path.rglob("*"))
        assert main(["export", "--workdir", str(tiny_run[0]), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: Could not write {out}: ") and why in err, err
        assert len(err.strip().splitlines()) == 1 and sorted(tmp_path.rglob("*")) == before


def test_a_cut_config_json_is_named_by_every_reader(tiny_run, tmp_path, capsys):
    grid = tmp_path / "grid"
    good, cut = grid / "residual8_seed0", grid / "residual8_seed1"
    shutil.copytree(tiny_run[0], good, ignore=shutil.ignore_patterns("checkpoints*", "eval"))
    shutil.copytree(good, cut)
    (cut / "config.json").write_text('{"model": {"fam')  # killed mid-write by an old version
    with open(good / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "split": "tr')  # and a metrics line cut short
    with pytest.raises(ValueError, match=f"{cut / 'config.json'} is not a valid JSON run config"):
        resnet_jax.load(cut)
    assert main(["evaluate", "--workdir", str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cut / 'config.json'} is not a valid JSON") and len(
        err.strip().splitlines()) == 1
    assert main(["report", str(grid), "--no-analysis"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"note: left out {cut}: {cut / 'config.json'} is not a valid")
    table = (grid / "report" / "table6.csv").read_text().splitlines()
    assert len(table) == 2 and ",1,1," in table[1]  # one run, finished; the cut line ignored


PNG_SIDE = 13_000


def _write_big_png(path, side: int = PNG_SIDE) -> None:
    """An RGB PNG of side x side pixels, written row by row (a few MB on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" + bytes(range(256)) * (3 * side // 256) + bytes(3 * side % 256)
    z = zlib.compressobj(1)
    idat = b"".join([z.compress(row) for _ in range(side)] + [z.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side,
                                                                        8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_predict_on_13000_px_images_bounds_memory(clf, tmp_path):
    """Four 13,000 px RGB PNGs (507 MB each decoded): `predict` decodes one full-size image at a
    time and returns its memory, so its peak grows by about one image, not four; Pillow's
    DecompressionBombWarning is not printed."""
    import os
    import re
    import subprocess
    import sys

    model = clf.export(tmp_path / "model.safetensors")
    folder = tmp_path / "big"
    folder.mkdir()
    _write_big_png(folder / "a.png")
    for name in "bcd":
        shutil.copy(folder / "a.png", folder / f"{name}.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "small.png")
    code = ("import resource, sys\n"
            "from resnet_jax.cli import main\n"
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "assert main(['predict', '--model', sys.argv[1], sys.argv[2]]) == 0\n"
            "before = peak()\n"
            "assert main(['predict', '--model', sys.argv[1], sys.argv[3]]) == 0\n"
            "print('PEAK', before, peak())\n")
    # One CPU device, as a user's machine has: the simulated devices' many threads share glibc's
    # arenas with the decoders and would hide memory that a decoding thread keeps.
    env = {**os.environ, "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                             os.environ.get("XLA_FLAGS", ""))}
    proc = subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "small.png"),
                           str(folder)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no DecompressionBombWarning or any other library output
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[1:5]] == [str(folder / f"{n}.png") for n in "abcd"]
    before, after = map(int, lines[-1].split()[1:])
    one_image = PNG_SIDE * PNG_SIDE * 3
    assert after - before < 1.5 * one_image, (before / 2**20, after / 2**20)
