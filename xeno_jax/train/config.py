"""Default training configuration (method.md A6) and its validation.

`default_config()` returns a locked ``ml_collections.ConfigDict``: reading or overriding a key
that does not exist (``--config.train.bach_size=4`` through ``config_flags``) is an error that
names the key. `validate_config` checks the values that have a fixed set of choices and the
arithmetic that must work out (batch size vs devices); `train.loop.train` calls it.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from xeno_jax.labels import SPECIES_12
from xeno_jax.models import DTYPES, MODEL_NAMES, NORMS, VARIANTS
from xeno_jax.train.parallel import BACKENDS


def default_config() -> ml_collections.ConfigDict:
    """The reference's training set-up; every field documented inline.

    Returns:
      A locked ConfigDict with sections ``model``, ``train``, ``parallel`` and ``augment``.
    """
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    # "unet" (ours) | "unet_efficientnet_b5" (the reference's smp U-Net; b0..b7 exist too)
    config.model.name = "unet"
    config.model.variant = "default"  # unet: "tiny" (CPU runs) | "default" (480x640, one GPU)
    # Channels per resolution level, overriding the variant's; depth = len(widths) - 1 2x
    # downsamplings. Empty: the variant's widths.
    config.model.widths = ()
    config.model.stem_width = 0  # channels of the 1x1 spectral stem; 0: the variant's
    config.model.norm = "batch"  # "batch" (synchronised over devices) | "group" | "none"
    config.model.dtype = "float32"  # computation dtype: "float32" | "bfloat16"; params float32
    config.model.in_channels = 100  # spectral channels of the input
    config.model.num_classes = SPECIES_12.num_classes  # 12; labels == 12 are invalid
    # Directory of a converted network (experiments.convert_weights) whose weights a new run
    # starts from, instead of a random initialisation; "" for none.
    config.model.init_from = ""

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 8  # global batch size, over all devices and hosts
    config.train.epochs = 100
    # Images per epoch; rounded up to a multiple of the batch size (500 -> 504 = 63 steps).
    config.train.epoch_size = 500
    config.train.learning_rate = 1e-3  # Adam, no weight decay
    config.train.lr_decay = 0.99  # exponential decay of the learning rate per epoch
    # Stochastic weight averaging as in the reference (Lightning SWA, annealing_epochs=0): with
    # S = int(swa_start * epochs), the parameters at the start of every epoch from S - 1 on
    # (0-based) are averaged, the learning rate stays at lr * lr_decay**(S - 1) from then on, and
    # batch-norm statistics of the average are recomputed with one pass over training batches.
    config.train.swa = True
    config.train.swa_start = 0.8
    config.train.seed = 0  # parameter init and the per-step augmentation keys
    config.train.log_every_steps = 10  # averaged training metrics to metrics.jsonl/TensorBoard
    config.train.checkpoint_every_steps = 315  # 5 epochs of 63 steps; plus a final checkpoint
    config.train.keep_checkpoints = 3  # newest checkpoints kept in the work directory
    config.train.validate_every_epochs = 10  # epochs between calls of the validation callback

    config.parallel = ml_collections.ConfigDict()
    config.parallel.backend = "shard_map"  # "shard_map" (jit + shard_map) | "pmap"
    config.parallel.num_devices = 0  # devices of the one-axis "data" mesh; 0: all devices

    config.augment = ml_collections.ConfigDict()
    # Augmentation steps in order, each with a section of its values, which the caller turns
    # into the `augment(key, batch) -> batch` that `train` takes
    # (xeno_jax.augment.steps_from_config); () is the identity.
    config.augment.steps = ()

    config.lock()
    return config


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Optimiser steps per epoch: ``ceil(epoch_size / batch_size)``."""
    return math.ceil(config.train.epoch_size / config.train.batch_size)


def swa_start_epoch(config: ml_collections.ConfigDict) -> int:
    """0-based epoch from whose start on parameters are averaged: ``max(int(f * E) - 1, 0)``."""
    return max(int(config.train.swa_start * config.train.epochs) - 1, 0)


def num_mesh_devices(config: ml_collections.ConfigDict) -> int:
    """Devices of the data mesh that `config.parallel.num_devices` asks for."""
    return config.parallel.num_devices or jax.device_count()


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks choices and arithmetic of a training config.

    Raises:
      ValueError: naming the key and the offending value.
    """
    choices = {
        "model.name": (config.model.name, MODEL_NAMES),
        "model.variant": (config.model.variant, tuple(VARIANTS)),
        "model.norm": (config.model.norm, NORMS),
        "model.dtype": (config.model.dtype, tuple(DTYPES)),
        "parallel.backend": (config.parallel.backend, BACKENDS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config.{key} must be one of {allowed}, got {value!r}")
    positive = {
        "train.batch_size": config.train.batch_size,
        "train.epochs": config.train.epochs,
        "train.epoch_size": config.train.epoch_size,
        "train.learning_rate": config.train.learning_rate,
        "train.log_every_steps": config.train.log_every_steps,
        "train.checkpoint_every_steps": config.train.checkpoint_every_steps,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "train.validate_every_epochs": config.train.validate_every_epochs,
        "model.in_channels": config.model.in_channels,
        "model.num_classes": config.model.num_classes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"config.{key} must be positive, got {value!r}")
    if not 0.0 <= config.train.swa_start <= 1.0:
        raise ValueError(f"config.train.swa_start must lie in [0, 1], got {config.train.swa_start}")
    num_devices = num_mesh_devices(config)
    if not 0 < num_devices <= jax.device_count():
        raise ValueError(
            f"config.parallel.num_devices={config.parallel.num_devices} but "
            f"{jax.device_count()} devices are available"
        )
    if jax.process_count() > 1 and num_devices != jax.device_count():
        raise ValueError(
            f"config.parallel.num_devices={config.parallel.num_devices}: a multi-process run "
            f"uses all {jax.device_count()} devices (set 0)"
        )
    if config.train.batch_size % num_devices:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} must be a multiple of the "
            f"{num_devices} devices of the data mesh"
        )
