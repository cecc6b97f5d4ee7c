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
  ``ProjectionBank`` there): a pure, jittable function of the whole global batch
  (`xeno_jax.train.step.augment_batch`), jitted over the batch's sharding before the
  per-device step (in the same program under shard_map), with a key folded with the step.
  The augmented batch is therefore the same on any number of devices and processes;
  batch-level augmentations such as organ transplantation pair images across devices.
  ``augment_data`` is placed on the devices once, as an input rather than a constant baked into
  the compiled program.
* ``val_fn(step, predict) -> {name: value}``: called every ``validate_every_epochs`` epochs with
  ``predict(features) -> probabilities`` bound to the current (not SWA-averaged) model, as the
  reference validates; and once at the end with the SWA model if SWA is on. ``predict`` is
  `xeno_jax.train.predict.predictor`'s: it takes a batch ``(n, H, W, C)`` as NumPy (any n, the
  same on every process), splits it over all devices and returns float32 softmax
  probabilities ``(n, H, W, num_classes)`` on every process. Every process calls `val_fn`;
  process 0 logs the results, prefixed ``val/`` (``val_swa/`` for the SWA model).

Nothing waits for the devices in an ordinary step: the NaN/Inf flag of a step is read while
the next one runs, and metrics are read at logging steps. A step with NaN or Inf leaves the
state unchanged, and every flag up to a step is read before that step's state is validated or
checkpointed, so no checkpoint ever holds the result of a failed step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from xeno_jax.models import build_model, load_pretrained
from xeno_jax.train import checkpoint as ckpt
from xeno_jax.train import fingerprint
from xeno_jax.train.config import steps_per_epoch, swa_start_epoch, validate_config
from xeno_jax.train.metrics_writer import MetricsWriter
from xeno_jax.train.parallel import (
    DATA_AXIS,
    data_parallel,
    fetch_replicated,
    make_mesh,
    put_replicated,
    replicated_sharding,
    shard_batch,
)
from xeno_jax.train.predict import PredictFn, predictor
from xeno_jax.train.state import (
    SWASchedule,
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from xeno_jax.train.step import (
    AugmentFn,
    augment_batch,
    batch_norm_statistics_step,
    identity_augment,
    train_step,
)

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
      init_state: ``(variables=None) -> TrainState``, jitted to the replicated layout of the
        mesh; `variables` replace the random initialisation.
    """

    epoch_steps: int
    total_steps: int
    swa_schedule: SWASchedule | None
    schedule: Callable[[Any], Any]
    optimizer: Any
    init_state: Callable[..., TrainState]


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
    reuse_stale: bool = False,
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
      reuse_stale: resume from checkpoints made with a different config (fingerprint) instead
        of refusing them.

    Returns:
      The final `TrainState`; ``state.final_variables()`` are the model's variables (the SWA
      average with its recomputed batch statistics if SWA is on).

    Raises:
      NonFiniteLossError: when a step has NaN/Inf in its loss or gradients.
      ValueError: for an invalid config or a model whose batch norm is not synchronised.
      StaleWorkError: when the checkpoint to resume from was made with another config.
      CorruptCheckpointError: when no checkpoint in the work directory can be read.
    """
    # ---- Set-up: mesh, model, schedule, optimiser ----------------------------------------
    validate_config(config)
    mesh = make_mesh(config.parallel.num_devices) if mesh is None else mesh
    model = build_model(config.model, axis_name=DATA_AXIS) if model is None else model
    setup = training_setup(config, model, mesh)
    epoch_steps, total_steps = setup.epoch_steps, setup.total_steps
    swa_schedule, schedule, optimizer = setup.swa_schedule, setup.schedule, setup.optimizer
    init_state = setup.init_state

    # ---- State: new, or restored from the newest intact checkpoint of the same config -----
    manager = ckpt.checkpoint_manager(workdir, max_to_keep=config.train.keep_checkpoints)
    record = fingerprint.of_run(config, augment_data)
    if manager.latest_step() is None:
        initial = None
        if config.model.get("init_from"):  # converted weights, e.g. the reference's networks
            _, initial = load_pretrained(config.model.init_from, like=config.model)
            initial = put_replicated(initial, mesh)
        state = init_state(variables=initial)
    else:
        try:
            state = ckpt.restore_newest_intact(
                manager, jax.eval_shape(init_state), train_iter,
                check_fingerprint=lambda step, stored: fingerprint.check(
                    record, stored, what=f"the checkpoint {manager.directory}/{step}",
                    reuse_stale=reuse_stale))
        except BaseException:  # a refused or unreadable checkpoint: release orbax's threads
            manager.close()
            raise
    if state.batch_stats and getattr(model, "axis_name", None) != DATA_AXIS:
        raise ValueError(
            f"the model has batch norm but averages its statistics over axis_name="
            f"{getattr(model, 'axis_name', None)!r}; data-parallel training needs {DATA_AXIS!r}"
        )
    start_step = int(fetch_replicated(state.step))

    # ---- The global-batch augmentation; per-device steps, launched over the mesh ----------
    parallel = functools.partial(data_parallel, mesh=mesh, backend=config.parallel.backend)
    augmented = augment is not identity_augment
    augment_global = functools.partial(augment_batch, augment=augment)
    # With an augmentation, one program augments the global batch and runs the per-device step.
    run_train_step = parallel(
        functools.partial(
            train_step, model=model, optimizer=optimizer, swa_schedule=swa_schedule
        ),
        donate=True,
        prepare=augment_global if augmented else None,
    )
    bind_predictor = predictor((model,), mesh, backend=config.parallel.backend)
    augment_data = put_replicated(augment_data, mesh)
    rng = put_replicated(fetch_replicated(state.rng), mesh)  # the state's own copy is donated

    def on_next_batch(run_step: Callable[..., Any], replicated: Any, key_step: int) -> Any:
        """`run_step` (made with ``prepare=augment_global`` when augmenting) on the next global
        training batch, augmented with the key of step `key_step` in the same program."""
        batch = shard_batch(next(train_iter), mesh)
        if not augmented:
            return run_step(replicated, batch)
        return run_step(replicated, batch,
                        (rng, put_replicated(np.int32(key_step), mesh), augment_data))

    unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # steps whose flag is not read yet

    def check_finite() -> None:
        """Reads the NaN/Inf flags of the steps not checked yet (waits for them)."""
        for step, metrics in unchecked:
            if not fetch_replicated(metrics["finite"]):
                raise NonFiniteLossError(step, fetch_replicated(metrics), manager.latest_step())
        unchecked.clear()

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
    projected: list[jax.Array] = []  # pixels the projection changed, per step of this epoch
    try:
        for step in range(start_step + 1, total_steps + 1):  # step: steps done after this one
            state, metrics = on_next_batch(run_train_step, state, step - 1)
            # The previous step's flag is read while this one runs. Had it failed, it left the
            # state unchanged, and this step's state is never checkpointed: it raises here.
            check_finite()
            unchecked.append((step, metrics))
            window.append(metrics)
            if "projected_pixels" in metrics:
                projected.append(metrics["projected_pixels"])
            progress.update()

            if step % config.train.log_every_steps == 0 or step == total_steps:
                check_finite()
                summary = _mean_metrics(window)
                summary["learning_rate"] = float(schedule(step - 1))
                writer.write(step, summary)
                progress.set_postfix(loss=f"{summary['loss']:.4f}")
                window = []

            epoch_done = step % epoch_steps == 0
            if epoch_done and projected:
                _log_projected_pixels(writer, step, step // epoch_steps, projected)
                projected = []
            if val_fn is not None and epoch_done and (
                (step // epoch_steps) % config.train.validate_every_epochs == 0
            ):
                check_finite()
                results = val_fn(step, bind_predictor([state.model_variables()]))
                writer.write(step, {f"val/{name}": value for name, value in results.items()})

            # The checkpoint at total_steps is written below, after the SWA batch-norm pass.
            if step % config.train.checkpoint_every_steps == 0 and step < total_steps:
                check_finite()
                ckpt.save_checkpoint(manager, state, train_iter, config, record.to_json())

        # ---- End of training: SWA batch norm, final checkpoint and validation -------------
        check_finite()
        if start_step < total_steps:
            # Only batch norm keeps running statistics that must match the averaged weights;
            # group norm normalises every image by its own statistics, so it needs no pass.
            if swa_schedule is not None and state.batch_stats:
                run_statistics_step = parallel(
                    functools.partial(batch_norm_statistics_step, model=model),
                    prepare=augment_global if augmented else None,
                )
                state = _recompute_swa_batch_stats(
                    state, total_steps, epoch_steps,
                    functools.partial(on_next_batch, run_statistics_step))
            ckpt.save_checkpoint(manager, state, train_iter, config, record.to_json())
            if val_fn is not None and swa_schedule is not None:
                results = val_fn(total_steps, bind_predictor([state.final_variables()]))
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


def _log_projected_pixels(writer: MetricsWriter, step: int, epoch: int,
                          counts: list[jax.Array]) -> None:
    """Logs (and writes as ``epoch/projected_pixels``) the pixels projected in an epoch's steps
    (after a resume in the middle of an epoch: in its steps since the resume)."""
    total = int(sum(int(fetch_replicated(count)) for count in counts))
    writer.write(step, {"epoch/projected_pixels": total})
    if total:
        logging.info("epoch %d: the projection changed %d pixels in %d steps", epoch, total,
                     len(counts))
    else:
        logging.warning("epoch %d: the projection changed no pixel in %d steps (no image was "
                        "selected, or none had a target label with matrices in the bank)",
                        epoch, len(counts))


def _recompute_swa_batch_stats(
    state: TrainState,
    first_key_step: int,
    num_batches: int,
    statistics_on_next_batch: Callable[[Any, int], Any],
) -> TrainState:
    """Batch-norm statistics of the SWA parameters, averaged over `num_batches` train batches.

    The reference's extra "batch-norm epoch" (PyTorch ``update_bn``): forward passes in training
    mode over one epoch of augmented training batches (augmentation keys of the steps from
    `first_key_step` on), without optimiser updates. `statistics_on_next_batch(inputs,
    key_step)` augments the next batch and computes its statistics in one program, as a training
    step does.
    """
    variables = {"params": state.swa_params, "batch_stats": state.batch_stats}
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    total = None
    for i in range(num_batches):
        step = first_key_step + i
        stats = statistics_on_next_batch((variables, state.rng, step), step)
        total = stats if total is None else add(total, stats)
    mean = jax.jit(lambda t: jax.tree.map(lambda x: x / num_batches, t))(total)
    return state.replace(swa_batch_stats=mean)
