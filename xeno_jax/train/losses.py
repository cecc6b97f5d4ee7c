"""The segmentation loss of the reference: (cross-entropy + soft Dice) / 2 over valid pixels.

Both terms are ratios of sums over all valid pixels of the batch (method.md A6):

* cross-entropy: ``sum_i CE_i / N_valid``, the mean over valid pixels;
* soft Dice (MONAI ``DiceLoss(softmax=True, batch=True)``): per class c,
  ``1 - (2 * sum_i p_ic y_ic + 1e-5) / (sum_i y_ic + sum_i p_ic + 1e-5)`` with softmax
  probabilities p and one-hot labels y, averaged over the classes that occur among the valid
  labels of the batch.

Data parallelism. Every device computes these sums over its own pixels (`loss_sums`), and
`segmentation_loss` adds them over the ``axis_name`` devices with ``lax.psum`` *before* forming
the ratios, so each device holds exactly the loss of the whole global batch. Differentiating that
value on each device and averaging the gradients with ``lax.pmean`` gives exactly the gradient of
the global-batch loss (JAX transposes the ``psum``; a per-device mean of ratios would not be the
global loss, since Dice is not additive over pixels).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

DICE_SMOOTH = 1e-5  # MONAI's smooth_nr = smooth_dr


class LossSums(NamedTuple):
    """Pixel sums that the loss is a function of; they add up over devices.

    Attributes:
      cross_entropy: sum of per-pixel cross-entropies over valid pixels.
      num_valid: number of valid pixels.
      intersection: ``(num_classes,)`` sum of p_c over valid pixels labelled c.
      predicted: ``(num_classes,)`` sum of p_c over valid pixels.
      labelled: ``(num_classes,)`` number of valid pixels labelled c.
    """

    cross_entropy: jax.Array
    num_valid: jax.Array
    intersection: jax.Array
    predicted: jax.Array
    labelled: jax.Array


def loss_sums(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> LossSums:
    """Sums of the loss over the valid pixels of one (per-device) batch.

    Args:
      logits: ``(..., num_classes)`` per-pixel logits.
      labels: ``(...)`` int labels; values outside ``0..num_classes-1`` (such as the invalid
        index) count as invalid whatever `valid` says.
      valid: ``(...)`` bool mask of the pixels that enter the loss.

    Returns:
      The float32 `LossSums`.
    """
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    valid = valid & (labels >= 0) & (labels < num_classes)
    weight = valid.astype(jnp.float32)[..., None]
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weight
    log_probs = jax.nn.log_softmax(logits)
    probs = jnp.exp(log_probs) * weight
    reduce = tuple(range(logits.ndim - 1))
    return LossSums(
        cross_entropy=-jnp.sum(one_hot * log_probs),
        num_valid=jnp.sum(weight),
        intersection=jnp.sum(probs * one_hot, axis=reduce),
        predicted=jnp.sum(probs, axis=reduce),
        labelled=jnp.sum(one_hot, axis=reduce),
    )


def loss_from_sums(sums: LossSums) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss from (global) pixel sums.

    Args:
      sums: `LossSums`, already added over every device that holds part of the batch.

    Returns:
      ``(loss, terms)``: loss = (CE + Dice) / 2, terms has "cross_entropy" and "dice" (the Dice
      loss, 1 - soft DSC). A batch without valid pixels gives 0 for all three.
    """
    cross_entropy = sums.cross_entropy / jnp.maximum(sums.num_valid, 1.0)
    dice_per_class = 1.0 - (2.0 * sums.intersection + DICE_SMOOTH) / (
        sums.labelled + sums.predicted + DICE_SMOOTH
    )
    present = (sums.labelled > 0).astype(jnp.float32)
    dice = jnp.sum(dice_per_class * present) / jnp.maximum(jnp.sum(present), 1.0)
    loss = (cross_entropy + dice) / 2.0
    return loss, {"cross_entropy": cross_entropy, "dice": dice}


def segmentation_loss(
    logits: jax.Array, labels: jax.Array, valid: jax.Array, *, axis_name: str | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(CE + soft Dice) / 2 over the valid pixels of the (global) batch.

    Args:
      logits: ``(B, H, W, num_classes)`` logits of this device's part of the batch.
      labels: ``(B, H, W)`` int labels.
      valid: ``(B, H, W)`` bool mask.
      axis_name: mapped axis whose devices together hold the global batch; their sums are
        added with ``lax.psum`` before the ratios are formed. None: the batch is all there is.

    Returns:
      ``(loss, terms)`` as `loss_from_sums`, the same on every device.
    """
    sums = loss_sums(logits, labels, valid)
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return loss_from_sums(sums)
