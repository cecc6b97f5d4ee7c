"""The training augmentation of a global batch, and the per-device steps, each written once.

`augment_batch` is a function of the whole global batch: jitted over the batch's sharding
(`xeno_jax.train.parallel.on_global_batch`, or as the ``prepare`` of
`xeno_jax.train.parallel.data_parallel`, in one program with the step), it gives the same
augmented batch on any number of devices and processes (XLA moves what crosses devices, such as
transplanted organs).

The train step, predict step and batch-norm statistics step are functions of ``(replicated,
batch_slice)`` in the pmap programming model and run inside
`xeno_jax.train.parallel.data_parallel` under the mapped axis ``"data"``; they receive batches
already augmented. Bind their keyword arguments with ``functools.partial`` before launching them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from xeno_jax.evaluate.ensemble import ensemble_predict
from xeno_jax.train.losses import segmentation_loss
from xeno_jax.train.parallel import DATA_AXIS
from xeno_jax.train.state import SWASchedule, TrainState, variables_dict

Batch = Mapping[str, jax.Array]
DROPOUT_STREAM = 1  # fold_in constant of the model's "dropout" key
AugmentFn = Callable[..., Batch]  # augment(key, batch) or augment(key, batch, augment_data)


def identity_augment(key: jax.Array, batch: Batch) -> Batch:
    """No augmentation."""
    del key
    return batch


def _as_float32(batch: Batch) -> Batch:
    """Features may arrive as float16 (half the host-to-device traffic); they are augmented
    and fed to the model as float32."""
    return {**batch, "features": batch["features"].astype(jnp.float32)}


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of the augmentation of `step`: the base key folded with the step.

    Args:
      rng: uint32 key data of the run's base key (`TrainState.rng`).
      step: int32 step number.

    Returns:
      A typed PRNG key, different for every step and the same on every device.
    """
    return jax.random.fold_in(jax.random.wrap_key_data(rng), step)


def augment_batch(
    batch: Batch,
    rng: jax.Array,
    step: jax.Array,
    augment_data: Any = None,
    *,
    augment: AugmentFn = identity_augment,
) -> Batch:
    """The training augmentation of step `step` applied to the whole global batch.

    Run it jitted on global arrays (`xeno_jax.train.parallel.on_global_batch`): XLA splits the
    work over the devices the batch lives on, while the result is that of one device holding
    every row, so a recipe means the same on any number of devices and processes (per-image
    draws come from one key for the whole batch; organ transplantation pairs rows across device
    boundaries). Per-image work (warps, flips, transplantation, L1) stays on each row's device;
    the projection step's tile loop (`xeno_jax.augment.project_spectra`) runs over the tiles of
    the whole batch on every device, with an all-reduce of each tile (2048 spectra).

    Args:
      batch: the global batch, features ``(B, H, W, C)`` (float16 or float32), labels, valid.
      rng: uint32 key data of the run's base key (`TrainState.rng`).
      step: int32 step number; the key is `step_key` of both.
      augment_data: passed to `augment` as its third argument (the projection bank), or None.
      augment: ``augment(key, batch[, augment_data]) -> batch``.

    Returns:
      The augmented batch with float32 features. A whole-batch count the augmentation adds
      (``projected_pixels``) is carried by row 0 of a per-row vector, so that it is sharded like
      the rest of the batch.
    """
    batch, key = _as_float32(batch), step_key(rng, step)
    out = augment(key, batch) if augment_data is None else augment(key, batch, augment_data)
    if "projected_pixels" in out:
        rows = out["features"].shape[0]
        out = {**out, "projected_pixels":
               jnp.zeros(rows, jnp.int32).at[0].set(out["projected_pixels"])}
    return out


def model_rngs(key: jax.Array) -> dict[str, jax.Array]:
    """The model's PRNG streams in training ("dropout": the EfficientNet's drop-connect).

    Derived from the step's key by ``fold_in``, so the augmentation's draws stay as they are.
    """
    return {"dropout": jax.random.fold_in(key, DROPOUT_STREAM)}


def take_swa_snapshot(state: TrainState, schedule: SWASchedule) -> TrainState:
    """Adds the parameters to the running SWA mean if `state.step` is a snapshot step.

    ``mean_{n+1} = mean_n + (params - mean_n) / (n + 1)`` (PyTorch ``AveragedModel``).
    """
    take = schedule.is_snapshot(state.step)
    count = state.swa_count.astype(jnp.float32)
    swa_params = jax.tree.map(
        lambda mean, p: jnp.where(take, mean + (p - mean) / (count + 1.0), mean),
        state.swa_params,
        state.params,
    )
    return state.replace(swa_params=swa_params, swa_count=state.swa_count + take.astype(jnp.int32))


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    swa_schedule: SWASchedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's slice of the (augmented) global batch.

    forward -> loss (pixel sums ``psum``-ed over devices, so it is the global-batch
    loss) -> gradients (``pmean`` over devices: the exact global-batch gradient) -> Adam ->
    SWA snapshot at epoch boundaries -> non-finite guard: if the loss or any gradient is NaN or
    Inf, the incoming state is returned unchanged and ``metrics["finite"]`` is False, so a state
    that reaches a checkpoint never holds NaN.

    Args:
      state: replicated train state.
      batch: this device's rows: "features" ``(b, H, W, C)`` float, "labels" ``(b, H, W)`` int,
        "valid" ``(b, H, W)`` bool (augmented beforehand by `augment_batch`).
      model: the network; its batch norm, if any, must average statistics over ``"data"``.
      optimizer: optax transformation whose state is ``state.opt_state``.
      swa_schedule: when to take SWA snapshots, or None without SWA.

    Returns:
      ``(new_state, metrics)``; metrics are the same on every device: "loss", "cross_entropy",
      "dice", "grad_norm", "finite" (bool) and, if the augmentation adds "projected_pixels" to
      the batch, their sum over devices.
    """
    key = step_key(state.rng, state.step)
    batch = _as_float32(batch)

    def loss_fn(params):
        logits, updates = model.apply(
            variables_dict(params, state.batch_stats),
            batch["features"],
            train=True,
            mutable=["batch_stats"],
            rngs=model_rngs(key),
        )
        loss, terms = segmentation_loss(
            logits, batch["labels"], batch["valid"], axis_name=DATA_AXIS
        )
        return loss, (terms, updates.get("batch_stats", {}))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, DATA_AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    if swa_schedule is not None:
        new_state = take_swa_snapshot(new_state, swa_schedule)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "finite": finite}
    if "projected_pixels" in batch:
        metrics["projected_pixels"] = lax.psum(jnp.sum(batch["projected_pixels"]), DATA_AXIS)
    return new_state, metrics


def predict_step(
    variables: Sequence[Mapping[str, Any]],
    features: jax.Array,
    *,
    models: Sequence[nn.Module],
) -> jax.Array:
    """Softmax probabilities ``(b, H, W, num_classes)`` float32 for this device's rows.

    With several models (a fold ensemble), their softmax probabilities are averaged, not their
    logits (``method.md`` C3, E12); the models run one after another.

    Args:
      variables: every model's variables (``{"params": ..., "batch_stats": ...}``), replicated.
      features: ``(b, H, W, C)`` spectra.
      models: the networks, one per entry of `variables`, evaluated with running batch
        statistics.

    Returns:
      The (mean) per-pixel class probabilities.
    """
    applies = [functools.partial(model.apply, train=False) for model in models]
    return ensemble_predict(applies, variables, features.astype(jnp.float32))[0]


def batch_norm_statistics_step(
    inputs: tuple[Mapping[str, Any], jax.Array, jax.Array], batch: Batch, *, model: nn.Module
) -> Any:
    """Batch-norm statistics of one global training batch, for fixed (SWA) parameters.

    The model runs in training mode with momentum 0, so the "running" statistics it returns are
    exactly this batch's mean and variance (averaged over devices by the synchronised batch
    norm). Averaging them over an epoch of batches is PyTorch's ``update_bn`` (momentum None),
    which the reference runs after SWA; variances are flax's biased ones.

    Args:
      inputs: ``(variables, rng, step)``: model variables with the parameters to use (the
        values of their ``batch_stats`` do not matter), the run's base key data and the step
        whose key drives the model's own randomness (drop-connect), as in `train_step`.
      batch: this device's rows of an (augmented) training batch.
      model: the network; it must have a ``bn_momentum`` attribute (as `UNet` has).

    Returns:
      The batch's ``batch_stats`` collection.
    """
    variables, rng, step = inputs
    _, updates = model.clone(bn_momentum=0.0).apply(
        variables, _as_float32(batch)["features"], train=True, mutable=["batch_stats"],
        rngs=model_rngs(step_key(rng, step))
    )
    return updates["batch_stats"]
