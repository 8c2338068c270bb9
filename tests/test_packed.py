"""Packed seeds (resnet_jax/train/packed.py): each packed run is the run it would be alone."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.config import ConfigError
from resnet_jax.train import (
    Checkpointer,
    abstract_state,
    make_mesh,
    make_optimizer,
    train_and_evaluate,
)
from resnet_jax.train.logger import read_metrics
from resnet_jax.train.packed import train_packed

STEPS = 50
SEEDS = (0, 1)
# Packs train on one device, as the grid's do on CPU: on the 8 simulated ones XLA gathers the batch
# for the vmapped convolutions and a step takes ~9x longer (train_packed's docstring). The single
# runs they are compared with use all 8, so the comparison also crosses meshes.
ONE_DEVICE = jax.devices()[:1]


def packed_test_config(seed: int, num_steps: int = STEPS):
    """ResNet-8, batch 8, constant lr 0.002 with the quick preset's augmentation."""
    config = tiny_config(batch_size=8, num_steps=num_steps, log_every=25, eval_every=50,
                         checkpoint_every=25, steps_per_call=1)
    config.optim.schedule = "constant"  # independent of num_steps, so a run can be extended
    config.optim.learning_rate = 0.002
    config.train.eval_splits = ("test",)
    config.train.keep_checkpoints = 5
    config.train.seed = seed
    return config


def restore(workdir, config, ds, step=None):
    """A run directory's state at `step` (default: the latest)."""
    t = config.train
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        return ckpt.restore(abstract_state(config, ds.spec, tx, NamedSharding(make_mesh(), P())),
                            step)
    finally:
        ckpt.close()


def max_rel_diff(a, b) -> float:
    """max over leaves of max|a - b| / max|b|: float32 rounding is ~1e-7..1e-6."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


class BatchRecorder:
    """Wraps the train step's `train_batch` to record every batch it draws, by (seed, step).

    Only observes: the packed and single runs below execute the library's own steps.
    """

    def __init__(self):
        import resnet_jax.train.step as step_module

        self.module, self.original = step_module, step_module.train_batch
        self.seen: dict[tuple[bytes, int], tuple] = {}

    def __enter__(self):
        def recording(images, labels, stats, key, step, *args, **kwargs):
            x, y = self.original(images, labels, stats, key, step, *args, **kwargs)
            jax.debug.callback(self.record, jax.random.key_data(key), step, x, y)
            return x, y

        self.module.train_batch = recording
        return self

    def record(self, rng, step, x, y):
        # Under vmap the callback sees one run at a time or the whole pack; handle both.
        rng, step, x, y = map(np.asarray, (rng, step, x, y))
        for i in np.ndindex(step.shape):
            self.seen[(rng[i].tobytes(), int(step[i]))] = (x[i], y[i])

    def __exit__(self, *exc):
        jax.effects_barrier()
        self.module.train_batch = self.original


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_dataset):
    """Seeds 0 and 1 trained 50 steps packed (batches recorded), and each alone (the reference)."""
    root = tmp_path_factory.mktemp("packed")
    configs = [packed_test_config(s) for s in SEEDS]
    lines = []
    with BatchRecorder() as batches:
        packed = train_packed(configs, [root / f"packed_seed{s}" for s in SEEDS],
                              dataset=sample_dataset, devices=ONE_DEVICE, log=lines.append)
    single = [train_and_evaluate(c, root / f"single_seed{c.train.seed}", dataset=sample_dataset,
                                 interactive=False) for c in configs]
    return root, packed, single, lines, batches.seen


def test_packed_runs_match_single_runs(runs, sample_dataset):
    root, packed, single, lines, _ = runs
    ds = sample_dataset
    # auto resolves to xla_cpu on 8 devices, so the pack keeps it (and says which it runs).
    assert any("in one program, backend xla_cpu" in line for line in lines), lines
    states = {}
    for s in SEEDS:
        config = packed_test_config(s)
        a = restore(root / f"packed_seed{s}", config, ds)
        b = restore(root / f"single_seed{s}", config, ds)
        states[s] = a
        assert int(a.step) == int(b.step) == STEPS
        # Measured max relative differences, seeds 0/1: after 1 step 1.7e-6/8.5e-7 (float32
        # rounding); after 50 steps 4.7e-4/5.1e-3 (at BN biases, small leaves; relative L2 of
        # all parameters 3.6e-6/3.6e-5): a ReLU input within rounding of 0 flips and SGD
        # amplifies it. The same single run on 1 instead of 8 devices (summation order only)
        # diverges alike: 4.5e-3 after 2 steps at lr 0.1. A wrong seed or batch gives ~1.
        rel = max_rel_diff((a.params, a.batch_stats), (b.params, b.batch_stats))
        assert rel < 2e-2, rel
        np.testing.assert_array_equal(np.asarray(a.rng), np.asarray(b.rng))
        # Its own directory, as a single run writes it: the same records at the same steps.
        pm, sm = read_metrics(root / f"packed_seed{s}"), read_metrics(root / f"single_seed{s}")
        assert [(r["step"], r["split"]) for r in pm] == [(r["step"], r["split"]) for r in sm]
        for r, q in zip(pm, sm, strict=True):
            assert r["loss"] == pytest.approx(q["loss"], rel=1e-2)
        cfg = json.loads((root / f"packed_seed{s}" / "config.json").read_text())
        ref = json.loads((root / f"single_seed{s}" / "config.json").read_text())
        assert cfg == ref
        versions = json.loads((root / f"packed_seed{s}" / "versions.json").read_text())
        assert versions["packed_with"] == [f"packed_seed{o}" for o in SEEDS if o != s]
    for i in range(2):
        assert packed[i]["test_error"] == pytest.approx(single[i]["test_error"], abs=1.0)
    # The measure can fail: two seeds differ at order 1.
    assert max_rel_diff(states[0].params, states[1].params) > 0.5


def check_batches_of_single_runs(seen: dict, ds, steps: range) -> None:
    """Asserts that the recorded packed batches are bitwise those a single run draws."""
    from resnet_jax.data import AugmentConfig, replicate, train_batch

    mesh = make_mesh(ONE_DEVICE)
    data = replicate((ds.train_images, ds.train_labels, ds.stats), mesh)
    aug = AugmentConfig.from_config(packed_test_config(0).data)
    # What the single run's step draws at `step` (resnet_jax/train/step.py).
    single = jax.jit(lambda rng, step: train_batch(
        *data, jax.random.wrap_key_data(rng), step, 8, aug,
        out_sharding=NamedSharding(mesh, P("data"))))
    rngs = {rng for rng, _ in seen}
    assert len(rngs) == len(SEEDS) and {s for _, s in seen} == set(steps)
    assert len(seen) == len(SEEDS) * len(steps)  # every step of every run, once
    for (rng, step), (x, y) in seen.items():
        want_x, want_y = single(np.frombuffer(rng, np.uint32), step)
        np.testing.assert_array_equal(x, np.asarray(want_x))
        np.testing.assert_array_equal(y, np.asarray(want_y))


def test_packed_batches_are_bitwise_those_of_the_single_runs(runs, sample_dataset):
    *_, seen = runs
    check_batches_of_single_runs(seen, sample_dataset, range(STEPS))


def test_packed_run_resumes_alone_and_single_runs_resume_packed(runs, tmp_path, sample_dataset):
    root, *_ = runs
    ds = sample_dataset

    def at_step_25(src, dst):
        # As if killed after the checkpoint of step 25: step 50's checkpoint is gone.
        shutil.copytree(root / src, tmp_path / dst)
        shutil.rmtree(tmp_path / dst / "checkpoints" / str(STEPS))
        return tmp_path / dst

    alone = at_step_25("packed_seed0", "alone")
    train_and_evaluate(packed_test_config(0), alone, dataset=ds, interactive=False)
    # A single run and a packed one, packed together from step 25.
    mixed = [at_step_25("single_seed0", "mixed0"), at_step_25("packed_seed1", "mixed1")]
    # Without the recorder: the ablate test below then finds this program compiled.
    train_packed([packed_test_config(s) for s in SEEDS], mixed, dataset=ds, devices=ONE_DEVICE,
                 log=lambda line: None)
    for workdir, s in [(alone, 0), (mixed[0], 0), (mixed[1], 1)]:
        config = packed_test_config(s)
        a = restore(workdir, config, ds)
        b = restore(root / f"single_seed{s}", config, ds)
        assert int(a.step) == STEPS
        assert max_rel_diff((a.params, a.batch_stats), (b.params, b.batch_stats)) < 2e-2
        steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
        assert steps == [25, 50]  # once each: the resume replaced what came after step 25


def test_packing_rejects_configs_that_differ_beyond_the_seed(tmp_path, sample_dataset):
    from resnet_jax.ablation.grid import resolve_pack
    from resnet_jax.train.packed import packed_config

    # Under vmap oneDNN's custom calls would run seed by seed: a pack takes XLA's CPU path.
    onednn, plain = packed_test_config(0), packed_test_config(0)
    onednn.model.backend, plain.model.backend = "onednn", "plain"
    assert packed_config(onednn).model.backend == "xla_cpu" and onednn.model.backend == "onednn"
    assert packed_config(plain).model.backend == "plain"

    # The grid's default: pack on one accelerator only; an explicit choice always wins.
    assert [resolve_pack(None, b, n) for b, n in [("gpu", 1), ("tpu", 1), ("cpu", 1), ("gpu", 8)]
            ] == [True, True, False, False]
    assert resolve_pack(True, "cpu", 8) and not resolve_pack(False, "gpu", 1)
    a, b = packed_test_config(0), packed_test_config(1)
    b.optim.learning_rate = 0.01
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        train_packed([a, b], [tmp_path / "a", tmp_path / "b"], dataset=sample_dataset)
    with pytest.raises(ConfigError, match="distinct seeds"):
        train_packed([a, packed_test_config(0)], [tmp_path / "a", tmp_path / "b"],
                     dataset=sample_dataset)


def test_ablate_packs_seeds_into_their_own_run_directories(tmp_path):
    import csv

    from resnet_jax.ablation.report import write_report
    from resnet_jax.cli import main

    # The packed_test_config program (batch 8, constant lr), 4 steps; on CPU the grid packs on
    # one device.
    overrides = ["--config.train.batch_size=8", "--config.train.num_steps=4",
                 "--config.train.log_every=2", "--config.train.eval_every=4",
                 "--config.train.checkpoint_every=2", "--config.train.eval_batch_size=200",
                 "--config.train.async_checkpoints=false", "--config.train.eval_splits=('test',)",
                 "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
                 "--config.optim.learning_rate=0.002"]
    argv = ["ablate", "--config", "quick", "--workdir", str(tmp_path), "--depths", "8",
            "--kinds", "residual", "--seeds", "0,1", *overrides]
    assert main([*argv, "--pack"]) == 0
    errors = []
    for s in SEEDS:
        workdir = tmp_path / f"residual8_seed{s}"
        assert json.loads((workdir / "config.json").read_text())["train"]["seed"] == s
        versions = json.loads((workdir / "versions.json").read_text())
        assert versions["packed_with"] == [f"residual8_seed{1 - s}"]
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
        errors.append([r for r in read_metrics(workdir) if r["split"] == "test"][-1]["error"])
    assert errors[0] != errors[1]  # two seeds, two runs
    write_report(tmp_path, analysis=False)
    with open(tmp_path / "report" / "table6.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["kind"], row["depth"], row["seeds"], row["finished"]) == ("residual", "8", "2", "2")
    assert float(row["test_error_mean"]) == pytest.approx(np.mean(errors), abs=1e-3)
    assert float(row["test_error_std"]) == pytest.approx(np.std(errors, ddof=1), abs=1e-3)
    # Rerun: nothing left to train, with or without packing.
    before = (tmp_path / "residual8_seed0" / "metrics.jsonl").read_bytes()
    assert main([*argv, "--no-pack"]) == 0
    assert (tmp_path / "residual8_seed0" / "metrics.jsonl").read_bytes() == before
