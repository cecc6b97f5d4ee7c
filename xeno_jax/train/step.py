"""The per-device train step, eval step and batch-norm statistics step, each written once.

All three are functions of ``(replicated, batch_slice)`` in the pmap programming model and run
inside `xeno_jax.train.parallel.data_parallel` under the mapped axis ``"data"``. Bind their
keyword arguments with ``functools.partial`` before launching them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from xeno_jax.train.losses import segmentation_loss
from xeno_jax.train.parallel import DATA_AXIS
from xeno_jax.train.state import SWASchedule, TrainState, variables_dict

Batch = Mapping[str, jax.Array]
AugmentFn = Callable[..., Batch]  # augment(key, batch) or augment(key, batch, augment_data)


def identity_augment(key: jax.Array, batch: Batch) -> Batch:
    """No augmentation."""
    del key
    return batch


def _augment(augment: AugmentFn, key: jax.Array, batch: Batch, augment_data: Any) -> Batch:
    """``augment(key, batch)``, or ``augment(key, batch, augment_data)`` if there is any.

    Features may arrive as float16 (half the host-to-device traffic); they are augmented and
    fed to the model as float32.
    """
    batch = {**batch, "features": batch["features"].astype(jnp.float32)}
    if augment_data is None:
        return augment(key, batch)
    return augment(key, batch, augment_data)


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of `step` on this device: base key folded with the step and device index.

    Args:
      rng: uint32 key data of the run's base key (`TrainState.rng`).
      step: int32 step number.

    Returns:
      A typed PRNG key, different for every step and device.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.random.fold_in(key, lax.axis_index(DATA_AXIS))


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
    augment_data: Any = None,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    augment: AugmentFn = identity_augment,
    swa_schedule: SWASchedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's slice of the global batch.

    augment -> forward -> loss (pixel sums ``psum``-ed over devices, so it is the global-batch
    loss) -> gradients (``pmean`` over devices: the exact global-batch gradient) -> Adam ->
    SWA snapshot at epoch boundaries -> non-finite guard: if the loss or any gradient is NaN or
    Inf, the incoming state is returned unchanged and ``metrics["finite"]`` is False, so a state
    that reaches a checkpoint never holds NaN.

    Args:
      state: replicated train state.
      batch: this device's rows: "features" ``(b, H, W, C)`` float, "labels" ``(b, H, W)`` int,
        "valid" ``(b, H, W)`` bool.
      augment_data: replicated pytree passed to `augment` as its third argument (such as the
        projection bank), or None.
      model: the network; its batch norm, if any, must average statistics over ``"data"``.
      optimizer: optax transformation whose state is ``state.opt_state``.
      augment: ``augment(key, batch[, augment_data]) -> batch`` (same keys and shapes), applied
        on each device to its own rows with a key folded with the step and the device index.
      swa_schedule: when to take SWA snapshots, or None without SWA.

    Returns:
      ``(new_state, metrics)``; metrics are the same on every device: "loss", "cross_entropy",
      "dice", "grad_norm", "finite" (bool) and, if the augmentation adds "projected_pixels" to
      the batch, their sum over devices.
    """
    batch = _augment(augment, step_key(state.rng, state.step), batch, augment_data)

    def loss_fn(params):
        logits, updates = model.apply(
            variables_dict(params, state.batch_stats),
            batch["features"],
            train=True,
            mutable=["batch_stats"],
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
        metrics["projected_pixels"] = lax.psum(batch["projected_pixels"], DATA_AXIS)
    return new_state, metrics


def predict_step(
    variables: Mapping[str, Any], features: jax.Array, *, model: nn.Module
) -> jax.Array:
    """Softmax probabilities ``(b, H, W, num_classes)`` float32 for this device's rows.

    Args:
      variables: model variables (``{"params": ..., "batch_stats": ...}``), replicated.
      features: ``(b, H, W, C)`` spectra.
      model: the network, evaluated with running batch statistics.

    Returns:
      The per-pixel class probabilities.
    """
    logits = model.apply(variables, features.astype(jnp.float32), train=False)
    return jax.nn.softmax(logits, axis=-1)


def batch_norm_statistics_step(
    inputs: tuple[Mapping[str, Any], jax.Array, jax.Array],
    batch: Batch,
    augment_data: Any = None,
    *,
    model: nn.Module,
    augment: AugmentFn = identity_augment,
) -> Any:
    """Batch-norm statistics of one global training batch, for fixed (SWA) parameters.

    The model runs in training mode with momentum 0, so the "running" statistics it returns are
    exactly this batch's mean and variance (averaged over devices by the synchronised batch
    norm). Averaging them over an epoch of batches is PyTorch's ``update_bn`` (momentum None),
    which the reference runs after SWA; variances are flax's biased ones.

    Args:
      inputs: ``(variables, rng, step)``: model variables with the parameters to use (the
        values of their ``batch_stats`` do not matter), the run's base key data, and the step
        number that the augmentation key is folded with.
      batch: this device's rows of a training batch.
      augment_data: as for `train_step`.
      model: the network; it must have a ``bn_momentum`` attribute (as `UNet` has).
      augment: the training augmentation.

    Returns:
      The batch's ``batch_stats`` collection.
    """
    variables, rng, step = inputs
    batch = _augment(augment, step_key(rng, step), batch, augment_data)
    _, updates = model.clone(bn_momentum=0.0).apply(
        variables, batch["features"], train=True, mutable=["batch_stats"]
    )
    return updates["batch_stats"]
