"""Training: optimizer, functional step, checkpoints, loop, FLOPs."""

from jaxeff.train.checkpoint import (CHECKSUM_FILE, Checkpointer, CheckpointError, RunDirLockedError, RunLock,
                                     check_run_config, load_run_config, restore_run)
from jaxeff.train.convert import convert_run
from jaxeff.train.flops import model_flops_per_token
from jaxeff.train.loop import NonFiniteLossError, init_params, train
from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from jaxeff.train.step import init_state, make_eval_step, make_train_step

__all__ = ["CHECKSUM_FILE", "CheckpointError", "Checkpointer", "NonFiniteLossError", "RunDirLockedError", "RunLock",
           "check_run_config", "convert_run", "init_params", "init_state", "learning_rate_schedule", "load_run_config",
           "make_eval_step", "make_optimizer", "make_train_step", "model_flops_per_token", "restore_run", "train",
           "weight_decay_mask"]
