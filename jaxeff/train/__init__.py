"""Training: optimizer, functional step, checkpoints, loop."""

from jaxeff.train.checkpoint import Checkpointer, CheckpointError, check_run_config, load_run_config
from jaxeff.train.loop import NonFiniteLossError, abstract_model, init_params, restore_run, train
from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from jaxeff.train.step import init_state, make_eval_step, make_train_step

__all__ = ["Checkpointer", "CheckpointError", "check_run_config", "load_run_config", "NonFiniteLossError",
           "abstract_model", "init_params", "restore_run", "train", "learning_rate_schedule", "make_optimizer",
           "weight_decay_mask", "init_state", "make_eval_step", "make_train_step"]
