"""Benchmark of a training step alone, with the augmentations, and fed by the input pipeline.

For each model and compute dtype, in one run with the repetitions of the modes interleaved:

- ``step``: the data-parallel training step (`xeno_jax.train.step.train_step`, launched over
  the mesh as `xeno_jax.train.train` launches it) on one batch already on the devices, no
  augmentation;
- ``step+augment``: the same batch through the xeno-learning augmentation pipeline (the A4
  steps of the pig2human malperfusion run config, kidney projections; a bank of 60 maps) as
  `train` runs it now: on the global batch (`xeno_jax.train.step.augment_batch`), in one program
  with the step (`data_parallel(..., prepare=...)`);
- ``step+augment per device [before]``: the augmentation as it ran before, inside the
  per-device step on each device's own rows (a key folded with the device index);
- ``step+augment+pipeline``: as `train` runs: every batch from `xeno_jax.data.train_iterator`
  (label-balanced sampler, grain reader threads, L1 normalisation, device placement), the
  global-batch augmentation and the step; the NaN/Inf flag is read one step late;
- ``step+augment+pipeline read every step [before]``: the same, waiting for every step's flag
  before the next step is dispatched (the host synchronisation the loop had before);
- ``augment alone``: the augmentation pipeline jitted on its own on the same batch, for
  comparison with what it adds to the step.

All modes except the last read the flag of a step one step late (the last one waits at the end
of a repetition), unless named otherwise. Models: ``quick`` (the tiny U-Net of the demo on 8 x
64 x 80 x 100 batches of pig sim_small), ``default`` (the default U-Net on 8 x 480 x 640 x 100,
a full-size simulated pig set that `input_pipeline.py` also uses, built once in --data_dir) and
``smoke`` (the tiny U-Net on 8 x 32 x 40 x 100 pig sim_tiny batches: checks the script runs).
Prints seconds per step, images per second and every mode as a ratio to ``step``; the
before/after pairs are measured side by side. On a CPU host the pipeline's threads compete
with the step for the same cores; on an accelerator they overlap with it. The issue's target:
pipeline and augmentations add < 10 %.

    python experiments/benchmarks/train.py                    # quick and default; CPU: ~40 min
    python experiments/benchmarks/train.py --models=quick     # CPU: ~3 min
    python experiments/benchmarks/train.py --models=default --dtypes=float32,bfloat16
    python experiments/benchmarks/train.py --models=smoke --steps=1 --repeats=1
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from experiments.benchmarks.augment import near_identity_bank
from experiments.benchmarks.input_pipeline import DATASET, SPLIT, build_dataset, load_average
from experiments.configs.run import get_config as run_config
from xeno_jax.augment import build_pipeline, steps_from_config
from xeno_jax.data import Catalog, train_iterator
from xeno_jax.labels import SPECIES_12
from xeno_jax.models import build_model
from xeno_jax.study import datasets
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
from xeno_jax.train.step import augment_batch, step_key, train_step

STEP, AUGMENT, PER_DEVICE = "step", "step+augment", "step+augment per device [before]"
PIPELINE, PIPELINE_SYNC = "step+augment+pipeline", "step+augment+pipeline read every step [before]"
ALONE = "augment alone"
MODES = (STEP, AUGMENT, PER_DEVICE, PIPELINE, PIPELINE_SYNC, ALONE)
MODELS = ("quick", "default", "smoke")
SMALL_DATASETS = {"quick": "sim_small", "smoke": "sim_tiny"}


def model_config(name: str, dtype: str) -> ml_collections.ConfigDict:
    config = default_config()
    with config.unlocked():
        config.model.variant = "default" if name == "default" else "tiny"
        config.model.dtype = dtype
        config.train.batch_size = 8
    return config


def per_device_augmented_step(state, batch, bank, *, step, augment):
    """The step as it was before the global-batch augmentation: every device augments its own
    rows inside the step, with the step key folded with its device index."""
    key = jax.random.fold_in(step_key(state.rng, state.step), lax.axis_index(DATA_AXIS))
    batch = augment(key, {**batch, "features": batch["features"].astype(jnp.float32)}, bank)
    return step(state, batch)


def dataset_records(name: str, data_dir: Path) -> tuple[Catalog, list]:
    if name in SMALL_DATASETS:
        datasets.ensure_dataset("pig", SMALL_DATASETS[name], data_dir)
        catalog = datasets.ensure_catalog(["pig"], SMALL_DATASETS[name], data_dir)
        return catalog, datasets.semantic_images(catalog, "pig")
    build_dataset(data_dir, images_per_set=5)
    catalog = Catalog([f"{DATASET}:{SPLIT}"], str(data_dir))
    return catalog, catalog.filter(experiment="semantic")


def benchmark(name: str, dtype: str, modes: list[str], args) -> dict[str, list[float]]:
    """Seconds per step of every mode, one entry per repetition."""
    config = model_config(name, dtype)
    mesh = make_mesh()
    catalog, records = dataset_records(name, Path(args.data_dir))
    iterator = train_iterator(catalog, records, batch_size=config.train.batch_size, mesh=mesh,
                              num_threads=args.threads)
    model = build_model(config.model, axis_name=DATA_AXIS)
    setup = training_setup(config, model, mesh)
    state = setup.init_state()
    rng = put_replicated(fetch_replicated(state.rng), mesh)
    step = functools.partial(train_step, model=model, optimizer=setup.optimizer)
    augment = build_pipeline(steps_from_config(
        run_config("projected-malperfusion_pig2human").augment))
    plain = data_parallel(step, mesh, donate=True)
    per_device = data_parallel(
        functools.partial(per_device_augmented_step, step=step, augment=augment), mesh,
        donate=True)
    augmented_step = data_parallel(
        step, mesh, donate=True, prepare=functools.partial(augment_batch, augment=augment))
    augment_alone = jax.jit(augment)
    kidney = SPECIES_12.name_to_index("kidney")
    bank = put_replicated(near_identity_bank(np.random.default_rng(0), [kidney], args.bank_pairs,
                                             config.model.in_channels), mesh)
    fixed = shard_batch(next(iterator), mesh)
    shape = "x".join(str(s) for s in fixed["features"].shape)
    print(f"\n{name} {dtype}: {config.model.variant} U-Net, batches {shape}, "
          f"{len(mesh.devices.flat)} device(s), {len(records)} training images")

    def augmented(state, batch, i):
        return augmented_step(state, batch, (rng, put_replicated(np.int32(i), mesh), bank))

    def run(mode: str, steps: int) -> float:
        nonlocal state
        start = time.perf_counter()
        unread = None
        for i in range(steps):
            if mode == STEP:
                state, metrics = plain(state, fixed)
            elif mode == AUGMENT:
                state, metrics = augmented(state, fixed, i)
            elif mode == PER_DEVICE:
                state, metrics = per_device(state, fixed, bank)
            elif mode in (PIPELINE, PIPELINE_SYNC):
                state, metrics = augmented(state, shard_batch(next(iterator), mesh), i)
            else:
                jax.block_until_ready(augment_alone(jax.random.key(i), fixed, bank))
                continue
            if unread is not None:
                fetch_replicated(unread["finite"])  # the loop's read, one step late
            unread = metrics
            if mode == PIPELINE_SYNC:
                fetch_replicated(metrics["finite"])
        jax.block_until_ready(state)
        return (time.perf_counter() - start) / steps

    try:
        for mode in modes:  # compilation and the iterator's start, not timed
            start = time.perf_counter()
            run(mode, 1)
            print(f"  first call of {mode}: {time.perf_counter() - start:.1f} s")
        seconds = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            shift = repeat % len(modes)
            for mode in modes[shift:] + modes[:shift]:  # rotate the order
                seconds[mode].append(run(mode, args.steps or (20 if name != "default" else 2)))
    finally:
        iterator.close()
    return seconds


def report(name: str, dtype: str, seconds: dict[str, list[float]], batch_size: int,
           device: str) -> None:
    base = np.array(seconds[STEP])
    for mode in seconds:
        values = np.array(seconds[mode])
        ratios = values / base
        print(f"  {mode:<48} {np.median(values):8.3f} s/batch [{device}]  "
              f"{batch_size / np.median(values):7.1f} images/s   "
              f"/ step: {np.median(ratios):.3f} [{ratios.min():.3f}, {ratios.max():.3f}]")
    pairs = [(PER_DEVICE, AUGMENT, "global-batch augmentation, step time after / before"),
             (PIPELINE_SYNC, PIPELINE, "no per-step read, step time after / before"),
             (STEP, PIPELINE, "pipeline + augmentations add (target < 10 %)")]
    for before, after, text in pairs:
        if before in seconds and after in seconds:
            ratios = np.array(seconds[after]) / np.array(seconds[before])
            value = (f"{100 * (np.median(ratios) - 1):+.1f} %" if before == STEP else
                     f"{np.median(ratios):.3f}")
            print(f"  RESULT {name} {dtype}: {text}: {value} "
                  f"[{ratios.min():.3f}, {ratios.max():.3f}]")
    print(f"  RESULT {name} {dtype}: step alone {np.median(base):.4f} s [{device}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="quick,default", help=f"comma-separated, of {MODELS}")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated compute dtypes, of float32, bfloat16")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {MODES}; {STEP!r} is always run")
    parser.add_argument("--data_dir", default="/tmp/bench_input_pipeline",
                        help="TFDS directory (shared with input_pipeline.py)")
    parser.add_argument("--steps", type=int, default=0,
                        help="timed steps per mode and repetition (0: 20, or 2 for default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="grain reader threads")
    parser.add_argument("--bank_pairs", type=int, default=60)
    args = parser.parse_args()
    models, dtypes = args.models.split(","), args.dtypes.split(",")
    modes = [STEP] + [m for m in args.modes.split(",") if m != STEP]
    for values, known, what in [(models, MODELS, "models"), (modes, MODES, "modes"),
                                (dtypes, ("float32", "bfloat16"), "dtypes")]:
        if set(values) - set(known):
            parser.error(f"unknown {what} {sorted(set(values) - set(known))}; known: {known}")
    device = jax.devices()[0]
    tag = "CPU" if device.platform == "cpu" else device.device_kind
    print(f"training step benchmark: jax {jax.__version__} on {device.platform} "
          f"({jax.device_count()} device(s), {os.cpu_count()} host cores); {load_average()}")
    for name in models:
        for dtype in dtypes:
            report(name, dtype, benchmark(name, dtype, modes, args), 8, tag)


if __name__ == "__main__":
    main()
