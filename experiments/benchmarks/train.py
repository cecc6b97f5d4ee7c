"""Benchmark of a training step alone, with the augmentations, and fed by the input pipeline.

For each model, in one run with the repetitions of the three modes interleaved:

- ``step``: the data-parallel training step (`xeno_jax.train.step.train_step`, launched over
  the mesh as `xeno_jax.train.train` launches it) on one batch already on the devices, no
  augmentation;
- ``step+augment``: the same batch through the xeno-learning augmentation pipeline (the A4
  steps of the pig2human malperfusion run config, kidney projections; a bank of 60 maps)
  inside the step;
- ``step+augment+pipeline``: as `train` runs: every batch from `xeno_jax.data.train_iterator`
  (label-balanced sampler, grain reader threads, L1 normalisation, device placement) over a
  simulated pig dataset, with the augmentation, one scalar read per step (the NaN guard);
- ``augment alone``: the augmentation pipeline jitted on its own on the same batch, for
  comparison with what it adds inside the step.

Models: ``quick`` (the tiny U-Net of the demo on 8 x 64 x 80 x 100 batches of pig sim_small)
and ``default`` (the default U-Net on 8 x 480 x 640 x 100, a full-size simulated pig set that
`input_pipeline.py` also uses, built once in --data_dir). Prints seconds per step, images per
second and the overhead of the augmentations and of the pipeline as ratios to ``step``. On a
CPU host the pipeline's threads compete with the step for the same cores; on an accelerator
they overlap with it. The issue's target: pipeline and augmentations add < 10 %.

    python experiments/benchmarks/train.py                    # both models; CPU: ~30 min
    python experiments/benchmarks/train.py --models=quick     # CPU: ~2 min
    python experiments/benchmarks/train.py --models=default --steps=2 --repeats=2
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from experiments.benchmarks.augment import near_identity_bank
from experiments.benchmarks.input_pipeline import DATASET, SPLIT, build_dataset, load_average
from xeno_jax.augment import build_pipeline, steps_from_config
from xeno_jax.data import Catalog, train_iterator
from xeno_jax.labels import SPECIES_12
from xeno_jax.models import build_model
from xeno_jax.study import runs
from xeno_jax.study.configurations import run_config
from xeno_jax.train import default_config
from xeno_jax.train.loop import training_setup
from xeno_jax.train.parallel import (
    DATA_AXIS,
    data_parallel,
    fetch_replicated,
    make_mesh,
    put_replicated,
    shard_batch,
)
from xeno_jax.train.step import train_step

MODES = ("step", "step+augment", "step+augment+pipeline", "augment alone")
MODELS = ("quick", "default")


def model_config(name: str) -> ml_collections.ConfigDict:
    config = default_config()
    with config.unlocked():
        config.model.variant = "tiny" if name == "quick" else "default"
        config.train.batch_size = 8
    return config


def dataset_records(name: str, data_dir: Path) -> tuple[Catalog, list]:
    if name == "quick":
        runs.ensure_dataset("pig", "sim_small", data_dir)
        catalog = runs.catalog_for(["pig"], "sim_small", data_dir)
        return catalog, runs.semantic_images(catalog, "pig")
    build_dataset(data_dir, images_per_set=5)
    catalog = Catalog([f"{DATASET}:{SPLIT}"], str(data_dir))
    return catalog, catalog.filter(experiment="semantic")


def benchmark(name: str, args) -> dict[str, list[float]]:
    """Seconds per step of every mode, one entry per repetition."""
    config = model_config(name)
    mesh = make_mesh()
    catalog, records = dataset_records(name, Path(args.data_dir))
    iterator = train_iterator(catalog, records, batch_size=config.train.batch_size, mesh=mesh,
                              num_threads=args.threads)
    model = build_model(config.model, axis_name=DATA_AXIS)
    setup = training_setup(config, model, mesh)
    state = setup.init_state()
    step = functools.partial(train_step, model=model, optimizer=setup.optimizer)
    augment = build_pipeline(steps_from_config(
        run_config("projected-malperfusion_pig2human").augment))
    plain = data_parallel(step, mesh, donate=True)
    augmented = data_parallel(functools.partial(step, augment=augment), mesh, donate=True)
    augment_alone = jax.jit(augment)
    kidney = SPECIES_12.name_to_index("kidney")
    bank = put_replicated(near_identity_bank(np.random.default_rng(0), [kidney], args.bank_pairs,
                                             config.model.in_channels), mesh)
    fixed = shard_batch(next(iterator), mesh)
    shape = "x".join(str(s) for s in fixed["features"].shape)
    print(f"\n{name}: {config.model.variant} U-Net, batches {shape}, {len(mesh.devices.flat)} "
          f"device(s), {len(records)} training images")

    def run(mode: str, steps: int) -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(steps):
            if mode == "step":
                state, metrics = plain(state, fixed, None)
            elif mode == "step+augment":
                state, metrics = augmented(state, fixed, bank)
            elif mode == "step+augment+pipeline":
                state, metrics = augmented(state, shard_batch(next(iterator), mesh), bank)
            else:
                jax.block_until_ready(augment_alone(jax.random.key(0), fixed, bank))
                continue
            fetch_replicated(metrics["finite"])  # the loop's per-step read
        jax.block_until_ready(state)
        return (time.perf_counter() - start) / steps

    try:
        for mode in MODES:  # compilation and the iterator's start, not timed
            start = time.perf_counter()
            run(mode, 1)
            print(f"  first call of {mode}: {time.perf_counter() - start:.1f} s")
        seconds = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES[repeat % 2::1] + MODES[:repeat % 2]:  # rotate the order
                seconds[mode].append(run(mode, args.steps or (20 if name == "quick" else 2)))
    finally:
        iterator.close()
    return seconds


def report(name: str, seconds: dict[str, list[float]], batch_size: int, device: str) -> None:
    base = np.array(seconds["step"])
    for mode in MODES:
        values = np.array(seconds[mode])
        ratios = values / base
        print(f"  {mode:<23} {np.median(values):8.3f} s/batch [{device}]  "
              f"{batch_size / np.median(values):7.1f} images/s   "
              f"/ step: {np.median(ratios):.3f} [{ratios.min():.3f}, {ratios.max():.3f}]")
    overhead = np.median(np.array(seconds["step+augment+pipeline"]) / base) - 1
    print(f"  pipeline + augmentations add {100 * overhead:.1f} % to the step (target < 10 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    parser.add_argument("--data_dir", default="/tmp/bench_input_pipeline",
                        help="TFDS directory (shared with input_pipeline.py)")
    parser.add_argument("--steps", type=int, default=0,
                        help="timed steps per mode and repetition (0: 20 quick, 2 default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="grain reader threads")
    parser.add_argument("--bank_pairs", type=int, default=60)
    args = parser.parse_args()
    models = args.models.split(",")
    if set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(models) - set(MODELS))}; known: {MODELS}")
    device = jax.devices()[0]
    tag = "CPU" if device.platform == "cpu" else device.device_kind
    print(f"training step benchmark: jax {jax.__version__} on {device.platform} "
          f"({jax.device_count()} device(s), {os.cpu_count()} host cores); {load_average()}")
    for name in models:
        report(name, benchmark(name, args), 8, tag)


if __name__ == "__main__":
    main()
