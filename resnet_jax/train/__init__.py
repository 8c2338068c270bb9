"""Training: train state, the sharded jitted step, optimisers, checkpoints, the run loop."""

from resnet_jax.train.checkpoint import Checkpointer, CheckpointError
from resnet_jax.train.evaluation import evaluate_split
from resnet_jax.train.loop import (
    DivergenceError,
    Preempted,
    make_mesh,
    maybe_initialize_distributed,
    restore_model,
    restore_run,
    train_and_evaluate,
)
from resnet_jax.train.optim import make_optimizer, make_schedule
from resnet_jax.train.state import (
    TrainState,
    abstract_state,
    create_state,
    graphdefs,
    init_state,
    model_from_config,
)
from resnet_jax.train.step import StepConfig, make_eval_step, make_multi_step, make_train_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DivergenceError",
    "Preempted",
    "StepConfig",
    "TrainState",
    "abstract_state",
    "create_state",
    "evaluate_split",
    "graphdefs",
    "init_state",
    "make_eval_step",
    "make_mesh",
    "make_multi_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "maybe_initialize_distributed",
    "model_from_config",
    "restore_model",
    "restore_run",
    "train_and_evaluate",
]
