"""Training state, optimiser and learning-rate schedule (method.md A6).

The state is one pytree that is replicated over the devices of the data mesh, donated to every
step and checkpointed as a whole: parameters, batch statistics, Adam state, step, the base PRNG
key (folded with the step and device index inside the step) and the stochastic-weight-averaging
(SWA) average with its count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class SWASchedule:
    """When the running SWA average takes a snapshot of the parameters.

    The reference (Lightning ``StochasticWeightAveraging``) averages the parameters at the start
    of every epoch from ``swa_start_epoch`` (0-based) to the last epoch, i.e. after optimiser
    steps ``first_step, first_step + every, ..., last_step``; step 0 means the initial parameters.
    The last epoch's own updates therefore never enter the average, as in the reference.

    Attributes:
      first_step: optimiser step of the first snapshot (``swa_start_epoch * steps_per_epoch``).
      last_step: optimiser step of the last snapshot (``(epochs - 1) * steps_per_epoch``).
      every: steps between snapshots (``steps_per_epoch``).
    """

    first_step: int
    last_step: int
    every: int

    def is_snapshot(self, step: Any) -> Any:
        """Whether the parameters after `step` optimiser steps enter the average."""
        return (step >= self.first_step) & (step <= self.last_step) & (step % self.every == 0)

    @property
    def num_snapshots(self) -> int:
        return max((self.last_step - self.first_step) // self.every + 1, 0)


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue exactly.

    Attributes:
      step: int32 scalar, optimiser steps taken.
      params: model parameters (float32).
      batch_stats: batch-norm running statistics; ``{}`` for models without batch norm.
      opt_state: optax state.
      rng: uint32 key data of the run's base PRNG key (`jax.random.key_data`).
      swa_params: running average of the parameter snapshots, or None without SWA.
      swa_count: int32 number of snapshots in `swa_params`, or None without SWA.
      swa_batch_stats: batch statistics recomputed for `swa_params` at the end of training
        (zeros before that; ``{}`` without batch norm), or None without SWA.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    swa_params: Any = None
    swa_count: jax.Array | None = None
    swa_batch_stats: Any = None

    def model_variables(self) -> dict[str, Any]:
        """Variables of the model being trained (for validation during training)."""
        return variables_dict(self.params, self.batch_stats)

    def final_variables(self) -> dict[str, Any]:
        """Variables of the final model: the SWA average if SWA is on, else the trained ones."""
        if self.swa_params is None:
            return self.model_variables()
        return variables_dict(self.swa_params, self.swa_batch_stats)


def variables_dict(params: Any, batch_stats: Any) -> dict[str, Any]:
    """Flax variables ``{"params": ..., "batch_stats": ...}``, without empty batch statistics."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def learning_rate_schedule(
    learning_rate: float, decay: float, steps_per_epoch: int, swa_start_epoch: int | None
) -> optax.Schedule:
    """Per-epoch exponential decay, frozen once SWA starts.

    Epoch e (0-based) trains with ``learning_rate * decay**e`` (PyTorch ``ExponentialLR`` stepped
    per epoch); from the SWA start epoch S' on, the rate stays at ``learning_rate * decay**S'``,
    the reference's constant SWA learning rate (``lr * gamma**(int(0.8 * epochs) - 1)``).

    Args:
      learning_rate: initial learning rate.
      decay: factor per epoch.
      steps_per_epoch: optimiser steps per epoch.
      swa_start_epoch: 0-based epoch at which SWA starts, or None without SWA.

    Returns:
      An optax schedule of the optimiser step.
    """
    end_value = None if swa_start_epoch is None else learning_rate * decay**swa_start_epoch
    return optax.exponential_decay(
        learning_rate,
        transition_steps=steps_per_epoch,
        decay_rate=decay,
        staircase=True,
        end_value=end_value,
    )


def make_optimizer(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Adam without weight decay (PyTorch defaults: betas 0.9/0.999, eps 1e-8)."""
    return optax.adam(learning_rate)


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    input_shape: tuple[int, ...],
    swa_schedule: SWASchedule | None,
    variables: Any = None,
) -> TrainState:
    """Initialises parameters, optimiser state, PRNG key and SWA average (jittable).

    Args:
      model: Flax module called as ``model.apply(variables, features, train=...)``.
      optimizer: the optax transformation.
      seed: seed of the parameter initialisation and of the run's base PRNG key.
      input_shape: shape of a dummy input ``(1, H, W, C)``; only C matters for the U-Net.
      swa_schedule: SWA snapshot schedule, or None without SWA.
      variables: start from these model variables (e.g. converted weights) instead of a
        random initialisation.

    Returns:
      The step-0 `TrainState`.
    """
    if variables is None:
        # Parameters are drawn with an RBG key: XLA compiles threefry-based initialisers slowly
        # on CPU (seconds for even a tiny network), and RBG's bits depending on the sharding
        # does not matter for replicated parameters. The per-step keys use threefry.
        init_key = jax.random.key(seed, impl="rbg")
        variables = model.init(init_key, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    swa_params = swa_count = swa_batch_stats = None
    if swa_schedule is not None:
        starts_now = swa_schedule.is_snapshot(0)
        swa_params = params
        swa_count = jnp.asarray(1 if starts_now else 0, jnp.int32)
        swa_batch_stats = jax.tree.map(jnp.zeros_like, batch_stats)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        swa_params=swa_params,
        swa_count=swa_count,
        swa_batch_stats=swa_batch_stats,
    )
