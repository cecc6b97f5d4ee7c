"""Fold ensembles: average the softmax probabilities (not the logits) of several models.

As the reference's ``TestEnsemble`` (``method.md`` A6, E12): 5 fold models in-species, 15 for
cross-species, perfusion and ICG data. The prediction is the argmax of the mean probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _softmax(logits) -> jax.Array:
    """Class probabilities (last axis) in at least float32."""
    logits = jnp.asarray(logits)
    return jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


def average_probabilities(logits) -> jax.Array:
    """Mean softmax probabilities over models. Jittable.

    Args:
      logits: ``(M, ..., K)``, model first, classes last (e.g. ``(M, B, H, W, K)``).

    Returns:
      ``(..., K)`` probabilities, float32 or wider.
    """
    return jnp.mean(_softmax(logits), axis=0)


def ensemble_predict(
    apply_fns: Callable[[Any, Any], Any] | Sequence[Callable[[Any, Any], Any]],
    params: Sequence[Any],
    inputs,
) -> tuple[jax.Array, jax.Array]:
    """Applies every model to `inputs` and averages their probabilities.

    Models run one after another, so memory holds one model's activations at a time; pass
    jitted apply functions for speed.

    Args:
      apply_fns: ``apply_fn(params, inputs) -> logits (..., K)``: one for all models, or one per
        model.
      params: the parameters of each model.
      inputs: the batch, e.g. features ``(B, H, W, C)``.

    Returns:
      ``(probabilities (..., K), labels (...))``: mean probabilities and their argmax.
    """
    if not params:
        raise ValueError("ensemble_predict needs the parameters of at least one model")
    if callable(apply_fns):
        apply_fns = [apply_fns] * len(params)
    if len(apply_fns) != len(params):
        raise ValueError(
            f"got {len(apply_fns)} apply functions for {len(params)} parameter sets"
        )
    total = sum(_softmax(apply(p, inputs)) for apply, p in zip(apply_fns, params, strict=True))
    probabilities = total / len(params)
    return probabilities, jnp.argmax(probabilities, axis=-1)
