"""The checkpointer's choice of "the best" step and what it keeps, on hand-made tiny states."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from resnet_jax.train import Checkpointer
from resnet_jax.train.state import TrainState


def tiny_state(step: int) -> TrainState:
    """A train state of a few numbers whose parameters record the step they were saved at."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((3,), float(step))},
                      batch_stats={}, opt_state={}, rng=jnp.zeros((2,), jnp.uint32),
                      loss_scale=jnp.ones(()), good_steps=zero, nonfinite_consecutive=zero,
                      nonfinite_total=zero)


def save_all(directory, saves, keep: int = 3) -> None:
    """Saves `(step, validation_error or None)` pairs in order with one (synchronous) writer."""
    ckpt = Checkpointer(directory, keep=keep, async_save=False)
    for step, error in saves:
        ckpt.save(tiny_state(step), None if error is None else {"validation_error": error})
    ckpt.close()


def test_best_step_is_the_lowest_validation_error_not_the_newest(tmp_path):
    save_all(tmp_path, [(10, 5.0), (20, 30.0), (30, 40.0)])
    reader = Checkpointer(tmp_path, read_only=True)  # a later process: metrics come from disk
    try:
        assert reader.steps() == [10, 20, 30]
        assert reader.best_step() == 10
        state = reader.restore(tiny_state(0), reader.best_step())
    finally:
        reader.close()
    assert int(state.step) == 10 and np.all(np.asarray(state.params["w"]) == 10.0)


def test_no_step_with_a_validation_error_means_no_best(tmp_path):
    save_all(tmp_path, [(10, None), (20, None)])
    reader = Checkpointer(tmp_path, read_only=True)
    try:
        assert reader.steps() == [10, 20] and reader.best_step() is None
    finally:
        reader.close()


def test_retention_keeps_the_last_k_plus_the_best_across_restarts(tmp_path):
    # The best (10) is older than the last 2; steps without an evaluation are kept while recent.
    save_all(tmp_path, [(10, 5.0), (20, 30.0), (30, None), (40, 50.0)], keep=2)
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.steps() == [10, 30, 40] and reader.best_step() == 10
    reader.close()
    # A resumed run (a new writer) still knows which step is best, and a new best replaces it.
    save_all(tmp_path, [(50, 60.0), (60, 4.0), (70, 70.0)], keep=2)
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.steps() == [60, 70] and reader.best_step() == 60
    reader.close()


def test_a_checkpoint_written_as_one_unnamed_item_still_restores(tmp_path):
    """Before the input iterator was saved beside it, a step held the state as Orbax's single
    default item; such a run restores (and resumes) with today's two-item checkpointer, without
    iterator state."""
    import orbax.checkpoint as ocp

    old = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    old.save(7, args=ocp.args.StandardSave(tiny_state(7).as_dict()))
    old.wait_until_finished()
    old.close()
    ckpt = Checkpointer(tmp_path, async_save=False)
    try:
        state = ckpt.restore(tiny_state(0))
        assert int(state.step) == 7 and np.all(np.asarray(state.params["w"]) == 7.0)
        assert ckpt.restored_data is False
        ckpt.save(tiny_state(8))  # and the run goes on, writing today's layout
    finally:
        ckpt.close()
    assert sorted(p.name for p in (tmp_path / "8").iterdir() if p.is_dir()) == ["default"]


def test_the_input_iterator_is_saved_and_restored_with_the_state(tmp_path):
    import grain

    ds = grain.MapDataset.range(100).batch(4)
    it = iter(ds.to_iter_dataset())
    for _ in range(5):
        next(it)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(tiny_state(5), data_iterator=it)
    ckpt.close()
    fresh = iter(ds.to_iter_dataset())
    reader = Checkpointer(tmp_path, read_only=True)
    try:
        state = reader.restore(tiny_state(0), data_iterator=fresh)
    finally:
        reader.close()
    assert int(state.step) == 5 and reader.restored_data is True
    np.testing.assert_array_equal(next(fresh), np.arange(20, 24))
