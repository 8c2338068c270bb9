"""Training: overfitting, data-parallel equivalence, exact resume, schedules, the quick preset."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.config import (
    ConfigError,
    apply_overrides,
    default_config,
    get_preset,
    resolve_steps_per_call,
)
from resnet_jax.data import AugmentConfig, replicate
from resnet_jax.rundir.metrics import read_metrics
from resnet_jax.train import (
    Checkpointer,
    StepConfig,
    abstract_state,
    create_state,
    graphdefs,
    make_mesh,
    make_optimizer,
    make_schedule,
    make_train_step,
    train_and_evaluate,
)


def small_dataset(ds, n_train):
    """The first `n_train` training images of `ds` (short epochs for resume tests)."""
    spec = dataclasses.replace(ds.spec, num_train=n_train)
    return dataclasses.replace(ds, train_images=ds.train_images[:n_train],
                               train_labels=ds.train_labels[:n_train], spec=spec)


def run_steps(config, ds, mesh, num_steps, aug=None):
    """Initialises a state and applies `num_steps` jitted train steps; returns (state, losses)."""
    t = config.train
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    schedule = make_schedule(config.optim, t.batch_size, t.num_steps)
    train_def, _ = graphdefs(config, ds.spec)
    repl = NamedSharding(mesh, P())
    state = create_state(config, ds.spec, tx, repl)
    data = replicate((ds.train_images, ds.train_labels, ds.stats), mesh)
    cfg = StepConfig(t.batch_size, aug or AugmentConfig.from_config(config.data),
                     dynamic_loss_scale=t.loss_scale > 0)
    step = jax.jit(make_train_step(train_def, tx, schedule, cfg, mesh))
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
    return state, losses


# Each optimiser and each dtype once (the four combinations cost twice the compile time).
@pytest.mark.parametrize("optimizer,lr,dtype", [("sgd", 0.05, "float32"),
                                                ("adam", 2e-3, "bfloat16")])
def test_overfits_a_small_batch(sample_dataset, optimizer, lr, dtype):
    config = tiny_config(batch_size=32)
    config.model.dtype = dtype
    config.optim.name = optimizer
    config.optim.learning_rate = lr
    config.optim.schedule = "constant"
    ds = small_dataset(sample_dataset, 32)  # one batch, seen every step
    _, losses = run_steps(config, ds, make_mesh(jax.devices()[:1]), 30,
                          aug=AugmentConfig(pad=0, crop=False, flip=False))
    assert losses[0] > 1.8  # ~ln(10) at init
    assert min(losses[-5:]) < 0.3 * losses[0], losses


def test_eight_devices_match_one_device(sample_dataset):
    assert jax.device_count() == 8
    config = tiny_config(batch_size=32)
    one, _ = run_steps(config, sample_dataset, make_mesh(jax.devices()[:1]), 1)
    eight, _ = run_steps(config, sample_dataset, make_mesh(), 1)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=5e-5)
    # Global BatchNorm: the running statistics agree too.
    for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=5e-5)


def _final_params(workdir, config, ds):
    t = config.train
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    target = abstract_state(config, ds.spec, tx, NamedSharding(make_mesh(), P()))
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        state = ckpt.restore(target)
    finally:
        ckpt.close()
    return state


def test_resume_is_bitwise_exact_across_an_epoch_boundary(tmp_path, sample_dataset):
    ds = small_dataset(sample_dataset, 80)  # 2 steps per epoch at batch 32
    config = tiny_config(batch_size=32, num_steps=6, checkpoint_every=3, eval_every=3,
                         log_every=3)
    # A schedule that does not depend on num_steps, which the interrupted run sets to 3.
    config.optim.schedule = "constant"
    config.train.eval_splits = ("validation",)
    full = train_and_evaluate(config, tmp_path / "full", dataset=ds, interactive=False)
    config.train.num_steps = 3
    train_and_evaluate(config, tmp_path / "resumed", dataset=ds, interactive=False)
    config.train.num_steps = 6
    resumed = train_and_evaluate(config, tmp_path / "resumed", dataset=ds, interactive=False)
    a = _final_params(tmp_path / "full", config, ds)
    b = _final_params(tmp_path / "resumed", config, ds)
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves(a.as_dict()), jax.tree.leaves(b.as_dict()), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert full["validation_error"] == resumed["validation_error"]
    # The resumed run logged steps 1-3 once and 4-6 once, like the uninterrupted one.
    train = [r for r in read_metrics(tmp_path / "resumed") if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    # The second attempt's clock starts from the first's, not from zero.
    assert train[1]["wall_time_s"] > train[0]["wall_time_s"] > 0


def test_tiny_run_writes_its_outputs(tiny_run):
    workdir, result = tiny_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["depth"] == 8 and config["train"]["num_steps"] == 20
    versions = json.loads((workdir / "versions.json").read_text())
    assert versions["jax"] == jax.__version__
    # 8 simulated CPU devices: auto keeps XLA's partitionable convolutions (backends.select).
    assert versions["backend"] == "xla_cpu"
    records = read_metrics(workdir)
    test_records = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in test_records] == [10, 20]
    assert all(r["count"] == 1000 for r in test_records)
    train = [r for r in records if r["split"] == "train"]
    assert config["train"]["steps_per_call"] == 5  # blocks of 5 steps per host call
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert train[-1]["loss"] < train[0]["loss"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [10, 20]
    assert list((workdir / "tensorboard").iterdir())
    assert result["test_error"] == test_records[-1]["error"]


def test_one_cpu_device_with_the_default_path_matches_eight_devices(preempted_run,
                                                                   sample_dataset):
    # `resnet-jax train` on one CPU device with the CLI's defaults (its CPU settings, the default
    # model.backend), stopped after a few steps; its first two logged losses against the same
    # two steps on 8 devices. The schedule's num_steps does not matter yet: step 1 runs at
    # schedule(0), the peak rate for any length, and step 2's loss is taken before its update.
    workdir = preempted_run[0]
    versions = json.loads((workdir / "versions.json").read_text())
    assert len(versions["devices"]) == 1 and versions["process_count"] == 1
    # The default on one CPU device: what auto picks there (oneDNN where it loads).
    from resnet_jax import backends

    assert versions["backend"] == backends.select("auto", num_devices=1, platform="cpu")[0]
    logged = {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}
    _, eight = run_steps(tiny_config(batch_size=32), sample_dataset, make_mesh(), 2)
    # Another device count (and maybe another convolution library) rounds differently: 1e-7
    # measured at step 2. A wrong gradient, BatchNorm statistic or padding is off by far more.
    np.testing.assert_allclose([logged[1], logged[2]], eight, rtol=1e-5)


def test_quick_preset_learns(tiny_run):
    # tiny_run is the quick preset at batch 64 for 20 steps (the full preset: see README).
    _, result = tiny_run
    assert result["test_error"] < 70.0  # chance is 90%


def test_paper_schedule_values():
    config = get_preset("cifar10_resnet56")
    schedule = make_schedule(config.optim, 128, 64000)
    values = [float(schedule(s)) for s in (0, 31999, 32000, 47999, 48000, 63999)]
    np.testing.assert_allclose(values, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_cifar10_presets_use_the_papers_data_recipe():
    from resnet_jax.config import available_presets
    from resnet_jax.data import compute_stats, split_indices

    names = [n for n in available_presets() if n.startswith("cifar10_")]
    assert len(names) == 10  # {plain, resnet} x {20, 32, 44, 56, 110}
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for name in names:
        data = get_preset(name).data
        assert data.name == "cifar10", name
        # 45k/5k: 5,000 of the 50,000 training images held out for validation.
        train_idx, val_idx = split_indices(50_000, data.validation_size, data.split_seed)
        assert (len(train_idx), len(val_idx)) == (45_000, 5_000), name
        # The per-pixel mean image of the training split, subtracted (then / 255).
        stats = compute_stats(images, data.normalization)
        np.testing.assert_allclose(stats.mean, images.mean(axis=0), rtol=1e-6, err_msg=name)
        # 4 pixels of zero padding, a random 32x32 crop, a random horizontal flip.
        assert AugmentConfig.from_config(data) == AugmentConfig(pad=4, crop=True, flip=True), name


def test_resnet110_warmup_then_paper_schedule():
    config = get_preset("cifar10_resnet110")
    schedule = make_schedule(config.optim, 128, 64000)
    values = [float(schedule(s)) for s in (0, 399, 400, 31999, 32000, 48000)]
    np.testing.assert_allclose(values, [0.01, 0.01, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)


def test_linear_warmup_cosine_and_batch_scaling():
    config = default_config()
    apply_overrides(config, ["optim.schedule=cosine", "optim.warmup=linear",
                             "optim.warmup_steps=100", "optim.scale_with_batch=true"])
    schedule = make_schedule(config.optim, 256, 1000)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(50)), 0.1, rtol=1e-6)  # half of 0.2
    np.testing.assert_allclose(float(schedule(100)), 0.2 * 0.5 * (1 + np.cos(np.pi * 0.1)),
                               rtol=1e-5)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-7)


def _model_params(spec) -> dict:
    """ResNet-8's real parameter tree (tiny config), filled with random numbers on the host."""
    from flax import nnx

    from resnet_jax.train.state import model_from_config

    model = nnx.eval_shape(lambda: model_from_config(tiny_config(), spec))
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _updates(optim_overrides: dict, params: dict, grads_per_step: list) -> list:
    """The optimiser's updates for a sequence of gradients, at a constant learning rate."""
    config = default_config()
    config.optim.schedule = "constant"
    for k, v in optim_overrides.items():
        config.optim[k] = v
    tx = make_optimizer(config.optim, 128, 10)
    opt_state, out = tx.init(params), []
    # One unoptimised compile is faster here than an optimised one or an eager op per leaf.
    update = jax.jit(tx.update).lower(params, opt_state, params).compile(
        {"xla_backend_optimization_level": 0})
    for grads in grads_per_step:
        updates, opt_state = update(grads, opt_state, params)
        out.append(updates)
    return out


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_weight_decay_mask_on_the_model_decays_kernels_only(sample_dataset):
    params = _model_params(sample_dataset.spec)
    zeros = jax.tree.map(np.zeros_like, params)
    # Conv and dense kernels have 2+ dimensions; BN scales and biases and the dense bias have 1.
    kernels = [p.ndim >= 2 for p in _leaves(params)]
    assert sum(kernels) == 8 and not all(kernels)  # stem + 6 block convs + the classifier
    for decay_all in (False, True):
        (updates,) = _updates({"decay_bn_and_bias": decay_all, "learning_rate": 1.0,
                               "momentum": 0.0, "weight_decay": 1e-4}, params, [zeros])
        for p, u, kernel in zip(_leaves(params), _leaves(updates), kernels, strict=True):
            np.testing.assert_allclose(u, -1e-4 * p if kernel or decay_all else 0 * p,
                                       rtol=1e-6)


def test_gradient_clipping_on_the_model_scales_to_the_global_norm(sample_dataset):
    params = _model_params(sample_dataset.spec)
    grads = params  # global norm ~ 200
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in _leaves(grads))))
    (updates,) = _updates({"grad_clip_norm": 0.5, "learning_rate": 1.0, "momentum": 0.0,
                           "weight_decay": 0.0}, params, [grads])
    for g, u in zip(_leaves(grads), _leaves(updates), strict=True):
        np.testing.assert_allclose(u, -g * 0.5 / norm, rtol=1e-5)


def test_nesterov_momentum_on_the_model(sample_dataset):
    params = _model_params(sample_dataset.spec)
    # Constant gradient g, momentum 0.9: the velocity is g, then 1.9 g; Nesterov steps along
    # g + 0.9 * velocity (1.9 g, then 2.71 g), plain momentum along the velocity (g, 1.9 g).
    for nesterov, factors in ((True, (1.9, 2.71)), (False, (1.0, 1.9))):
        steps = _updates({"nesterov": nesterov, "learning_rate": 1.0, "momentum": 0.9,
                          "weight_decay": 0.0}, params, [params, params])
        for updates, factor in zip(steps, factors, strict=True):
            for g, u in zip(_leaves(params), _leaves(updates), strict=True):
                np.testing.assert_allclose(u, -factor * g, rtol=1e-5)


def test_adamw_decouples_weight_decay_on_the_model(sample_dataset):
    params = _model_params(sample_dataset.spec)
    zeros = jax.tree.map(np.zeros_like, params)
    # Zero gradients: Adam's own step is 0, so the update is the decoupled decay, lr * wd * p
    # (kernels only here). Decay added to the gradient (Adam + L2) would step by ~lr instead.
    (updates,) = _updates({"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.1,
                           "decay_bn_and_bias": False}, params, [zeros])
    for p, u in zip(_leaves(params), _leaves(updates), strict=True):
        np.testing.assert_allclose(u, -0.01 * 0.1 * p if p.ndim >= 2 else 0 * p, rtol=1e-5,
                                   atol=1e-12)


def test_overrides_parse_types_and_reject_unknown_keys():
    config = default_config()
    apply_overrides(config, ["--config.model.depth=56", "config.optim.learning_rate=0.05",
                             "train.eval_splits=test", "model.scan_blocks=true",
                             "optim.boundaries=(100,200)"])
    assert config.model.depth == 56 and config.optim.learning_rate == 0.05
    assert config.train.eval_splits == ("test",) and config.model.scan_blocks is True
    assert config.optim.boundaries == (100, 200)
    with pytest.raises(ConfigError, match="model.depth"):
        apply_overrides(config, ["model.dpeth=20"])
    with pytest.raises(ConfigError, match="valid int"):
        apply_overrides(config, ["model.depth=deep"])


def test_resume_refuses_a_different_config(tiny_run, sample_dataset):
    workdir, _ = tiny_run
    config = tiny_config()
    config.model.family = "cifar_plain"
    with pytest.raises(ConfigError, match="model.family"):
        train_and_evaluate(config, workdir, dataset=sample_dataset, interactive=False)


def test_runs_saved_before_a_config_key_existed_still_restore_and_resume(tiny_run, tmp_path):
    import shutil

    from resnet_jax.train import restore_run
    from resnet_jax.train.loop import check_resume_compatible

    workdir, _ = tiny_run
    old = tmp_path / "old_run"
    shutil.copytree(workdir, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["model"]["bn_group_size"]  # as written before the key was added
    (old / "config.json").write_text(json.dumps(saved))
    check_resume_compatible(old, tiny_config())  # no "changed config" error
    config, _, state, _, _ = restore_run(old)
    assert config.model.bn_group_size == 0 and int(state.step) == 20


def test_float16_dynamic_loss_scale_skips_overflow_and_halves(sample_dataset):
    config = tiny_config(batch_size=32, loss_scale=2.0**20)
    config.model.dtype = "float16"
    ds = small_dataset(sample_dataset, 32)
    # At 2^20 the float16 backward pass overflows (the logits' gradient alone is ~2^20 / 32,
    # above float16's 65504): such steps are skipped and counted, and the scale halves.
    state, losses = run_steps(config, ds, make_mesh(jax.devices()[:1]), 12,
                              aug=AugmentConfig(pad=0, crop=False, flip=False))
    skipped = int(state.nonfinite_total)
    assert 1 <= skipped < 10 and losses[-1] < losses[skipped]  # then it trains
    assert float(state.loss_scale) == 2.0**20 / 2**skipped
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert int(state.step) == 12


def test_auto_steps_per_call_is_one_on_cpu_and_divides_the_intervals_elsewhere():
    paper = get_preset("cifar10_resnet20").train  # log 100, eval and checkpoint every 2000
    assert paper.steps_per_call == 0  # auto by default
    assert resolve_steps_per_call(paper, "cpu") == 1
    assert resolve_steps_per_call(paper, "gpu") == 100
    assert resolve_steps_per_call(get_preset("quick").train, "tpu") == 20  # 20 / 100 / 100
    assert resolve_steps_per_call(get_preset("mini").train, "gpu") == 5  # 10 / 50 / 25
    paper.steps_per_call = 7
    assert resolve_steps_per_call(paper, "gpu") == 7  # an explicit value wins everywhere
    assert resolve_steps_per_call(paper, "cpu") == 7


def _tensorboard_scalars(logdir) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every event file under `logdir` (TFRecord framing, parsed here)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(logdir.iterdir()):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_events_hold_every_logged_value(tiny_run):
    workdir, _ = tiny_run
    scalars = _tensorboard_scalars(workdir / "tensorboard")
    records = read_metrics(workdir)
    want = {(f"{r['split']}/{k}", r["step"]): v for r in records for k, v in r.items()
            if k not in ("split", "step")}
    assert len(want) >= 30 and set(scalars) == set(want)
    assert all(scalars[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())


def test_progress_bar_fits_an_80_column_terminal(tmp_path, monkeypatch):
    """In a pseudo-terminal 80 columns wide the bar line shows step, bar, loss, img/s and ETA."""
    import fcntl
    import os
    import pty
    import re
    import struct
    import sys
    import termios
    import threading

    from resnet_jax.train.logger import MetricsLogger

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal was closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    terminal = open(slave, "w", buffering=1, closefd=True)  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    log = MetricsLogger(tmp_path, 64000, 0, 128)  # interactive: stdout is a terminal
    log.write(12800, "train", {"error": 12.5, "grad_norm": 1.2345, "learning_rate": 0.1,
                               "loss": 0.4321, "images_per_second": 12345.6,
                               "nonfinite_total": 0})
    log.progress.refresh()
    log.close()
    terminal.close()
    reader.join(timeout=10)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", b"".join(chunks).decode())
    lines = [x for x in re.split(r"[\r\n]+", text) if x.strip()]
    bars = [x for x in lines if x.startswith("step 12800/64000 ")]
    assert bars, lines
    bar = bars[-1]
    assert len(bar) <= 80 and "━" in bar, bar
    assert re.search(r"loss 0\.432 +12,346 img/s +ETA +(\d+:\d\d:\d\d|-:--:--)$", bar), bar
    # The full record is a log line above the bar (and in metrics.jsonl).
    assert any("grad_norm=1.234" in x and "learning_rate=0.1" in x for x in lines)
