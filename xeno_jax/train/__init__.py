"""Data-parallel training: config, state, loss, global-batch augmentation, the per-device steps,
launchers, prediction, checkpoints, loop.

Entry points: `default_config()` for the settings, `train(config, workdir, train_iter=...)` for a
run (resumes from the work directory), and the pieces it is made of for custom loops.
"""

from xeno_jax.train.checkpoint import (
    DataIterator,
    checkpoint_manager,
    restore_checkpoint,
    save_checkpoint,
)
from xeno_jax.train.config import default_config, steps_per_epoch, validate_config
from xeno_jax.train.loop import NonFiniteLossError, train
from xeno_jax.train.losses import segmentation_loss
from xeno_jax.train.metrics_writer import MetricsWriter
from xeno_jax.train.parallel import DATA_AXIS, data_parallel, make_mesh, shard_batch
from xeno_jax.train.predict import predictor
from xeno_jax.train.state import TrainState
from xeno_jax.train.step import augment_batch, identity_augment, predict_step, train_step

__all__ = [
    "DATA_AXIS",
    "DataIterator",
    "MetricsWriter",
    "NonFiniteLossError",
    "TrainState",
    "augment_batch",
    "checkpoint_manager",
    "data_parallel",
    "default_config",
    "identity_augment",
    "make_mesh",
    "predict_step",
    "predictor",
    "restore_checkpoint",
    "save_checkpoint",
    "segmentation_loss",
    "shard_batch",
    "steps_per_epoch",
    "train",
    "train_step",
    "validate_config",
]
