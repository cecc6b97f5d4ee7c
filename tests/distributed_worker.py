"""Fakes for the training tests, and the worker process of the two-process test.

As a module it provides a deterministic in-memory data iterator with grain's
``get_state``/``set_state`` protocol, a tiny random dataset, a tiny training config and the
xeno-learning augmentation for its images.

As a script it is one process of a multi-process run on localhost:

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python tests/distributed_worker.py --process_id=0 --num_processes=2 --port=12345 \
      --workdir=/tmp/run --backend=shard_map --output=/tmp/params.npz

It calls ``jax.distributed.initialize``, trains with `xeno_jax.train.train` on this process's
rows of every batch with the xeno-learning augmentation, validates with the loop's predictor,
and (process 0) writes the final parameters and the predictions to ``--output``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

NUM_CHANNELS = 4
IMAGE_SIZE = 16


class SimulatedCrash(RuntimeError):
    """Raised by `InMemoryIterator` to simulate a run dying at a given batch."""


class InMemoryIterator:
    """Deterministic batches from in-memory arrays, with a checkpointable position.

    Global batch i holds rows ``(i * B + arange(B)) % N``; a process gets the contiguous
    ``B / process_count`` rows of its index.

    Args:
      data: arrays with a leading example dimension.
      global_batch_size: B.
      process_index, process_count: this process's share of every batch.
      nan_at: batch index whose features are NaN (to test the non-finite guard).
      crash_at: batch index at which ``next`` raises `SimulatedCrash`.
    """

    def __init__(self, data, global_batch_size, *, process_index=0, process_count=1,
                 nan_at=None, crash_at=None):
        self.data = data
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.nan_at = nan_at
        self.crash_at = crash_at
        self.position = 0
        self.seen: list[int] = []

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.crash_at:
            raise SimulatedCrash(f"simulated crash before batch {self.position}")
        num_examples = len(next(iter(self.data.values())))
        rows = (self.position * self.global_batch_size + np.arange(self.global_batch_size))
        rows = rows[self.process_index * self.local_batch_size:][: self.local_batch_size]
        batch = {name: array[rows % num_examples] for name, array in self.data.items()}
        if self.position == self.nan_at:
            batch["features"] = np.full_like(batch["features"], np.nan)
        self.seen.append(self.position)
        self.position += 1
        return batch

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def make_dataset(num_examples=24, seed=0):
    """Random L1-normalised spectra with labels 0..11, some invalid (12)."""
    rng = np.random.default_rng(seed)
    shape = (num_examples, IMAGE_SIZE, IMAGE_SIZE)
    features = rng.uniform(0.1, 1.0, (*shape, NUM_CHANNELS)).astype(np.float32)
    features /= features.sum(-1, keepdims=True)
    labels = rng.integers(0, 12, shape).astype(np.int32)
    valid = rng.uniform(size=shape) > 0.2
    labels[~valid] = 12
    return {"features": features, "labels": labels, "valid": valid}


def xeno_augmentation(seed=0):
    """``(augment, bank)``: the xeno-learning steps of the pig2human malperfusion run config
    (kidney) with a random near-identity bank of `NUM_CHANNELS`-band maps, for `make_dataset`
    images."""
    from xeno_jax.augment import build_pipeline, steps_from_config
    from xeno_jax.labels import SPECIES_12
    from xeno_jax.projections import ProjectionBank

    rng = np.random.default_rng(seed)
    pairs = 3
    weights = np.eye(NUM_CHANNELS) + rng.normal(0, 0.2, (pairs, NUM_CHANNELS, NUM_CHANNELS))
    biases = rng.normal(0, 0.01, (pairs, NUM_CHANNELS))
    bank = ProjectionBank.from_pairs({SPECIES_12.name_to_index("kidney"): (weights, biases)})
    from experiments.configs.run import get_config as run_config

    steps = steps_from_config(run_config("projected-malperfusion_pig2human").augment)
    return build_pipeline(steps), bank


VALIDATION_IMAGES = 3  # not a multiple of the device count: predict pads


def validation_recorder(predictions):
    """A ``val_fn`` that stores the probabilities of the first `VALIDATION_IMAGES` images."""
    features = make_dataset()["features"][:VALIDATION_IMAGES]

    def val_fn(step, predict):
        predictions[step] = predict(features)
        return {"max_probability": float(predictions[step].max())}

    return val_fn


def tiny_config(*, num_devices=0, backend="shard_map", steps=5, batch_size=8, norm="batch",
                swa=False):
    """A config for a few steps of a tiny U-Net on `make_dataset` images (one epoch).

    The learning rate is small because Adam makes every update about ``lr * sign(grad)``: when
    float rounding (which differs with the device count) flips the ReLU gate of a single pixel
    whose pre-activation is within ~1e-7 of zero, a parameter whose gradient nearly cancels can
    move by a sizeable fraction of the learning rate. At 1e-5 that stays far below the 1e-5
    tolerance of the exactness tests, while a real data-parallel error (wrong statistics, losses
    or gradients) still shows in the per-step loss and gradient norm, which they compare tightly
    (Adam's updates alone would not reveal a wrong gradient scale).
    """
    from xeno_jax.train import default_config

    config = default_config()
    config.model.variant = "tiny"
    config.model.widths = (4, 8)
    config.model.norm = norm
    config.model.in_channels = NUM_CHANNELS
    config.train.batch_size = batch_size
    config.train.epochs = 1
    config.train.epoch_size = steps * batch_size
    config.train.learning_rate = 1e-5
    config.train.swa = swa
    config.train.log_every_steps = 1
    config.train.validate_every_epochs = 1
    config.train.checkpoint_every_steps = 1000
    config.parallel.backend = backend
    config.parallel.num_devices = num_devices
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--backend", default="shard_map")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    import jax

    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    from xeno_jax.train import parallel, train

    config = tiny_config(backend=args.backend)
    data_iter = InMemoryIterator(
        make_dataset(),
        config.train.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    augment, bank = xeno_augmentation()
    predictions = {}
    state = train(config, args.workdir, train_iter=data_iter, augment=augment, augment_data=bank,
                  val_fn=validation_recorder(predictions))
    params = parallel.fetch_replicated(state.params)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        flat.update({f"prediction_{step}": p for step, p in predictions.items()})
        np.savez(args.output + ".tmp.npz", **flat)
        os.replace(args.output + ".tmp.npz", args.output)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
