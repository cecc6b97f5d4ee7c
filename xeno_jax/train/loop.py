"""The training loop: one function, read top to bottom.

`train` sets up the mesh, model, optimiser and state, resumes from the latest checkpoint in the
work directory if there is one, runs the data-parallel steps with periodic logging, validation
and checkpoints, and finishes stochastic weight averaging (SWA) with a batch-norm pass.

How it is fed (see `train` for the exact signatures):

* ``train_iter``: ``next(train_iter)`` returns this process's rows of the next global batch as
  a dict of "features" ``(b, H, W, C)`` (float32, or float16 to halve host-to-device traffic),
  "labels" ``(b, H, W)`` int32 (invalid index 12) and "valid" ``(b, H, W)`` bool, as NumPy
  arrays (b = batch_size / process_count) or as global ``jax.Array``s already sharded over the
  mesh. It also has ``get_state()`` / ``set_state(state)`` (grain's iterator protocol; JSON or
  bytes), which checkpoints store. One ``next`` call per optimiser step, plus one epoch of
  batches for the SWA batch-norm pass at the end.
* ``augment(key, batch) -> batch``, or ``augment(key, batch, augment_data) -> batch`` when
  `train` gets ``augment_data`` (``xeno_jax.augment.pipeline.build_pipeline`` functions take the
  ``ProjectionBank`` there): a pure, jittable function, run on each device on its own rows inside
  the step, with a key folded with the step and the device index. Batch-level augmentations
  such as organ transplantation therefore act within each device's rows, like the reference's
  per-GPU batches; ``augment_data`` is placed on the devices once, as an input of the step
  rather than a constant baked into the compiled program.
* ``val_fn(step, predict) -> {name: value}``: called every ``validate_every_epochs`` epochs with
  ``predict(features) -> probabilities`` bound to the current (not SWA-averaged) model, as the
  reference validates; and once at the end with the SWA model if SWA is on. ``predict`` takes
  this process's rows ``(n, H, W, C)`` as NumPy (any n; every process passes the same n) and
  returns float32 softmax probabilities ``(n, H, W, num_classes)``. Every process calls
  `val_fn` (``predict`` runs on all devices); process 0 logs the results, prefixed ``val/``
  (``val_swa/`` for the SWA model).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from xeno_jax.models import build_model
from xeno_jax.train import checkpoint as ckpt
from xeno_jax.train.config import steps_per_epoch, swa_start_epoch, validate_config
from xeno_jax.train.metrics_writer import MetricsWriter
from xeno_jax.train.parallel import (
    DATA_AXIS,
    data_parallel,
    fetch_local_rows,
    fetch_replicated,
    make_mesh,
    put_replicated,
    replicated_sharding,
    shard_batch,
)
from xeno_jax.train.state import (
    SWASchedule,
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from xeno_jax.train.step import (
    AugmentFn,
    batch_norm_statistics_step,
    identity_augment,
    predict_step,
    train_step,
)

PredictFn = Callable[[np.ndarray], np.ndarray]
ValidateFn = Callable[[int, PredictFn], Mapping[str, float]]

INIT_INPUT_SIZE = 32  # height and width of the dummy input that initialises the parameters


class NonFiniteLossError(FloatingPointError):
    """Training stopped because a step had NaN or Inf in its loss or gradients.

    The state was not updated by that step and nothing after it was checkpointed, so the latest
    checkpoint in the work directory is the last good one.

    Attributes:
      step: the 1-based number of the failing step.
      metrics: that step's metrics.
    """

    def __init__(self, step: int, metrics: Mapping[str, float], latest_checkpoint: int | None):
        self.step = step
        self.metrics = dict(metrics)
        super().__init__(
            f"non-finite loss or gradients in training step {step} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}); training stopped. The latest checkpoint "
            f"(step {latest_checkpoint}) is intact and a rerun resumes from it."
        )


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What a run's config determines before any data is seen.

    Attributes:
      epoch_steps, total_steps: optimiser steps per epoch and in all.
      swa_schedule: SWA snapshot steps, or None without SWA.
      schedule: the learning-rate schedule.
      optimizer: the optax transformation.
      init_state: ``() -> TrainState``, jitted to the replicated layout of the mesh.
    """

    epoch_steps: int
    total_steps: int
    swa_schedule: SWASchedule | None
    schedule: Callable[[Any], Any]
    optimizer: Any
    init_state: Callable[[], TrainState]


def training_setup(config: ml_collections.ConfigDict, model: Any,
                   mesh: jax.sharding.Mesh) -> TrainingSetup:
    """Schedule, optimiser and state initialiser of a run (shared by `train` and restoring)."""
    epoch_steps = steps_per_epoch(config)
    total_steps = config.train.epochs * epoch_steps
    swa_epoch = swa_start_epoch(config) if config.train.swa else None
    swa_schedule = None
    if swa_epoch is not None:
        swa_schedule = SWASchedule(
            first_step=swa_epoch * epoch_steps,
            last_step=(config.train.epochs - 1) * epoch_steps,
            every=epoch_steps,
        )
    schedule = learning_rate_schedule(
        config.train.learning_rate, config.train.lr_decay, epoch_steps, swa_epoch
    )
    optimizer = make_optimizer(schedule)
    init_state = jax.jit(
        functools.partial(
            create_train_state,
            model,
            optimizer,
            seed=config.train.seed,
            input_shape=(1, INIT_INPUT_SIZE, INIT_INPUT_SIZE, config.model.in_channels),
            swa_schedule=swa_schedule,
        ),
        out_shardings=replicated_sharding(mesh),
    )
    return TrainingSetup(epoch_steps, total_steps, swa_schedule, schedule, optimizer, init_state)


def restore_final_variables(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The final model variables of a run (the SWA average if SWA is on), on the host.

    Raises:
      FileNotFoundError: if the work directory holds no checkpoint.
    """
    mesh = make_mesh(config.parallel.num_devices)
    setup = training_setup(config, build_model(config.model, axis_name=DATA_AXIS), mesh)
    manager = ckpt.checkpoint_manager(workdir, max_to_keep=None)
    try:
        state = ckpt.restore_checkpoint(manager, jax.eval_shape(setup.init_state))
    finally:
        manager.close()
    return jax.device_get(state.final_variables())


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    train_iter: ckpt.DataIterator,
    mesh: jax.sharding.Mesh | None = None,
    model: Any = None,
    augment: AugmentFn = identity_augment,
    augment_data: Any = None,
    val_fn: ValidateFn | None = None,
) -> TrainState:
    """Trains (or resumes training of) a segmentation network.

    Args:
      config: a config like `xeno_jax.train.config.default_config()`.
      workdir: directory for checkpoints, ``metrics.jsonl`` and TensorBoard files; a run finds
        its latest checkpoint there and continues exactly from it (parameters, optimiser state,
        step, PRNG key, SWA average and the iterator's position).
      train_iter: the training data iterator (module docstring).
      mesh: the data mesh `train_iter` was made for; None makes it from ``config.parallel``.
      model: a Flax module; None builds ``config.model``. Batch norm must be synchronised over
        the ``"data"`` axis (``build_model(..., axis_name="data")``).
      augment: the training augmentation (module docstring).
      augment_data: host pytree (the same on every process), e.g. the ``ProjectionBank``,
        placed once on every device and passed to ``augment`` as its third argument; None calls
        ``augment(key, batch)``.
      val_fn: the validation callback (module docstring), or None.

    Returns:
      The final `TrainState`; ``state.final_variables()`` are the model's variables (the SWA
      average with its recomputed batch statistics if SWA is on).

    Raises:
      NonFiniteLossError: when a step has NaN/Inf in its loss or gradients.
      ValueError: for an invalid config or a model whose batch norm is not synchronised.
    """
    # ---- Set-up: mesh, model, schedule, optimiser ----------------------------------------
    validate_config(config)
    mesh = make_mesh(config.parallel.num_devices) if mesh is None else mesh
    model = build_model(config.model, axis_name=DATA_AXIS) if model is None else model
    setup = training_setup(config, model, mesh)
    epoch_steps, total_steps = setup.epoch_steps, setup.total_steps
    swa_schedule, schedule, optimizer = setup.swa_schedule, setup.schedule, setup.optimizer
    init_state = setup.init_state

    # ---- State: new, or restored from the latest checkpoint -------------------------------
    manager = ckpt.checkpoint_manager(workdir, max_to_keep=config.train.keep_checkpoints)
    if manager.latest_step() is None:
        state = init_state()
    else:
        state = ckpt.restore_checkpoint(manager, jax.eval_shape(init_state), train_iter)
    if state.batch_stats and getattr(model, "axis_name", None) != DATA_AXIS:
        raise ValueError(
            f"the model has batch norm but averages its statistics over axis_name="
            f"{getattr(model, 'axis_name', None)!r}; data-parallel training needs {DATA_AXIS!r}"
        )
    start_step = int(fetch_replicated(state.step))

    # ---- Per-device steps, launched over the mesh -----------------------------------------
    parallel = functools.partial(data_parallel, mesh=mesh, backend=config.parallel.backend)
    run_train_step = parallel(
        functools.partial(
            train_step, model=model, optimizer=optimizer, augment=augment, swa_schedule=swa_schedule
        ),
        donate=True,
    )
    run_predict = parallel(functools.partial(predict_step, model=model), sharded_output=True)
    augment_data = put_replicated(augment_data, mesh)

    def predictor(variables: Any) -> PredictFn:
        def predict(features: np.ndarray) -> np.ndarray:
            rows = len(features)
            padding = [(0, -rows % len(mesh.local_devices))] + [(0, 0)] * (features.ndim - 1)
            batch = shard_batch({"features": np.pad(features, padding)}, mesh)
            return fetch_local_rows(run_predict(variables, batch["features"]))[:rows]

        return predict

    # ---- Training loop --------------------------------------------------------------------
    writer = MetricsWriter(workdir, resume_step=start_step)
    progress = tqdm.tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    )
    window: list[dict[str, jax.Array]] = []
    try:
        for step in range(start_step + 1, total_steps + 1):  # step: steps done after this one
            batch = shard_batch(next(train_iter), mesh)
            state, metrics = run_train_step(state, batch, augment_data)
            # One scalar read per step: a failed step must stop the loop before another step
            # moves the (unchanged, still good) state on.
            if not fetch_replicated(metrics["finite"]):
                raise NonFiniteLossError(step, fetch_replicated(metrics), manager.latest_step())
            window.append(metrics)
            progress.update()

            if step % config.train.log_every_steps == 0 or step == total_steps:
                summary = _mean_metrics(window)
                summary["learning_rate"] = float(schedule(step - 1))
                writer.write(step, summary)
                progress.set_postfix(loss=f"{summary['loss']:.4f}")
                window = []

            epoch_done = step % epoch_steps == 0
            if val_fn is not None and epoch_done and (
                (step // epoch_steps) % config.train.validate_every_epochs == 0
            ):
                results = val_fn(step, predictor(state.model_variables()))
                writer.write(step, {f"val/{name}": value for name, value in results.items()})

            # The checkpoint at total_steps is written below, after the SWA batch-norm pass.
            if step % config.train.checkpoint_every_steps == 0 and step < total_steps:
                ckpt.save_checkpoint(manager, state, train_iter, config)

        # ---- End of training: SWA batch norm, final checkpoint and validation -------------
        if start_step < total_steps:
            # Only batch norm keeps running statistics that must match the averaged weights;
            # group norm normalises every image by its own statistics, so it needs no pass.
            if swa_schedule is not None and state.batch_stats:
                run_statistics_step = parallel(
                    functools.partial(batch_norm_statistics_step, model=model, augment=augment)
                )
                state = _recompute_swa_batch_stats(
                    state, train_iter, epoch_steps, run_statistics_step, mesh, augment_data
                )
            ckpt.save_checkpoint(manager, state, train_iter, config)
            if val_fn is not None and swa_schedule is not None:
                results = val_fn(total_steps, predictor(state.final_variables()))
                writer.write(total_steps, {f"val_swa/{name}": v for name, v in results.items()})
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        progress.close()
    return state


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Host means of the steps' scalar metrics (without the "finite" flag)."""
    host = [fetch_replicated(m) for m in window]
    return {name: float(np.mean([m[name] for m in host])) for name in host[0] if name != "finite"}


def _recompute_swa_batch_stats(
    state: TrainState,
    train_iter: ckpt.DataIterator,
    num_batches: int,
    run_statistics_step: Callable[..., Any],
    mesh: jax.sharding.Mesh,
    augment_data: Any,
) -> TrainState:
    """Batch-norm statistics of the SWA parameters, averaged over `num_batches` train batches.

    The reference's extra "batch-norm epoch" (PyTorch ``update_bn``): forward passes in training
    mode over one epoch of augmented training batches, without optimiser updates.
    """
    variables = {"params": state.swa_params, "batch_stats": state.batch_stats}
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    total = None
    for i in range(num_batches):
        batch = shard_batch(next(train_iter), mesh)
        stats = run_statistics_step((variables, state.rng, state.step + i), batch, augment_data)
        total = stats if total is None else add(total, stats)
    mean = jax.jit(lambda t: jax.tree.map(lambda x: x / num_batches, t))(total)
    return state.replace(swa_batch_stats=mean)
