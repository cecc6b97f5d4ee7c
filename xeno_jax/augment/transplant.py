"""Organ transplantation between the images of a batch (``method.md`` A4, MICCAI 2023)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xeno_jax.augment.geometric import check_batch


def transplant_organs(key: jax.Array, features: jax.Array, labels: jax.Array, valid: jax.Array,
                      *, p: float = 0.8, num_classes: int = 12):
    """Copies one organ of each donor image into its acceptor at the same pixel coordinates.

    The first ``n = int(p * B)`` images are donors (the batch order is already random); donor d
    gives to image ``(d - 1) mod B``, so image i receives from image i + 1. Each donor draws one
    label uniformly from the labels of its valid pixels (background included), and the acceptor's
    features, labels and valid mask are overwritten where the donor has that label on a valid
    pixel. Every donor gives from the batch as it was before any transplantation (so with p = 1
    the last image receives image 0's organ as it was originally). A donor without valid pixels
    gives nothing; invalid pixels are never moved.

    Args:
      key: PRNG key.
      features: ``(B, H, W, C)``.
      labels: ``(B, H, W)`` int; the labels of valid pixels lie in ``0 .. num_classes - 1``.
      valid: ``(B, H, W)`` bool.
      p: fraction of the batch that donates.
      num_classes: number of valid label values.

    Returns:
      ``(features, labels, valid)``, shapes and dtypes of the inputs.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    check_batch(features, labels, valid)
    batch = features.shape[0]
    num_donors = int(p * batch)
    if num_donors == 0:
        return features, labels, valid
    classes = jnp.arange(num_classes, dtype=labels.dtype)
    present = jnp.any((labels[..., None] == classes) & valid[..., None], axis=(1, 2))  # (B, K)
    score = jax.random.uniform(key, present.shape)
    organ = jnp.argmax(jnp.where(present, score, -1.0), axis=1).astype(labels.dtype)
    gives = (jnp.arange(batch) < num_donors) & jnp.any(present, axis=1)
    donated = (labels == organ[:, None, None]) & valid & gives[:, None, None]
    # Image a receives from image a + 1: shift the donors' pixels down by one batch position.
    received = jnp.roll(donated, -1, axis=0)

    def receive(x):
        mask = received.reshape(received.shape + (1,) * (x.ndim - 3))
        return jnp.where(mask, jnp.roll(x, -1, axis=0), x)

    return receive(features), receive(labels), receive(valid)
