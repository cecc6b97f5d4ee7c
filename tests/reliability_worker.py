"""A tiny projected training run, in the test process or as a process to kill.

As a module it provides the run the reliability tests share: `config` (2 devices, 6 steps,
checkpoints every 2 steps), `bank` (kidney matrices only) and `train_projected`. As a script it
trains that run in ``--workdir`` (resuming if it holds checkpoints) and writes the final
parameters to ``--output``:

    python tests/reliability_worker.py --workdir=/tmp/run --output=/tmp/params.npz
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_worker import NUM_CHANNELS, InMemoryIterator, make_dataset, tiny_config

KIDNEY = 6  # xeno_jax.labels.SPECIES_12.name_to_index("kidney"), checked by the tests


def config(**overrides):
    config = tiny_config(num_devices=2, steps=6)
    config.train.checkpoint_every_steps = 2
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def bank():
    from xeno_jax.projections import ProjectionBank

    rng = np.random.default_rng(3)
    weights = np.eye(NUM_CHANNELS) + 0.1 * rng.normal(size=(2, NUM_CHANNELS, NUM_CHANNELS))
    return ProjectionBank.from_pairs({KIDNEY: (weights, 0.01 * np.ones((2, NUM_CHANNELS)))},
                                     label_names={KIDNEY: "kidney"})


def augment():
    from xeno_jax.augment import build_pipeline

    return build_pipeline([{"name": "projection", "p": 1.0, "target_labels": ["kidney"]}])


def train_projected(workdir, run_config=None, data_iter=None, **kwargs):
    """Trains the projected run in `workdir`; returns the final state on the host."""
    from xeno_jax.train import train
    from xeno_jax.train.parallel import fetch_replicated

    run_config = config() if run_config is None else run_config
    data_iter = InMemoryIterator(make_dataset(), 8) if data_iter is None else data_iter
    state = train(run_config, str(workdir), train_iter=data_iter, augment=augment(),
                  augment_data=bank(), **kwargs)
    return fetch_replicated(state)


def flat_params(state) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    params = flat_params(train_projected(args.workdir))
    np.savez(args.output + ".tmp.npz", **params)
    os.replace(args.output + ".tmp.npz", args.output)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    main()
