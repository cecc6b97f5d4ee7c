"""Projection learning: one affine map per (physiological, pathological) image pair.

For every pair of a source (physiological) image and a target (pathological) image this fits
``y = x W + b`` (``x`` a row-vector spectrum) so that the per-channel mean and unbiased standard
deviation of the mapped source spectra match those of the target spectra (``method.md`` A2):

    loss = mean_c (mean(Y)_c - mean(T)_c)^2 + mean_c (std(Y)_c - std(T)_c)^2,   Y = X W + b

with Adam (lr 0.01, betas 0.9/0.999, eps 1e-8), ``W = I`` and ``b = 0`` at the start of every pair,
and a fixed number of full-batch steps. The loss needs only per-image sufficient statistics:
``mean(Y) = mu W + b`` and ``var(Y)_c = (W^T Sigma W)_cc`` with the source mean ``mu`` and unbiased
covariance ``Sigma``, and the target mean and standard deviation. So every image is read once, in
chunks, into these statistics (`spectra_statistics`), and all pairs are then fitted together with
`jax.vmap`, a chunk of pairs at a time, without touching a pixel again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MODES = ("weights", "bias", "weights+bias")


class SpectraStatistics(NamedTuple):
    """Per-channel statistics of the spectra of one image (or a stack of images).

    Attributes:
      count: number of spectra.
      mean: ``(C,)`` per-channel mean.
      spread: ``(C, C)`` unbiased (N-1) covariance, or ``(C,)`` unbiased variance.
    """

    count: jax.Array
    mean: jax.Array
    spread: jax.Array


def spectra_statistics(spectra, *, covariance: bool = True,
                       chunk_size: int = 16384) -> SpectraStatistics:
    """Mean and unbiased covariance (or variance) of ``(n, C)`` spectra in one streaming pass.

    The spectra are read in chunks of `chunk_size` rows (so a large host array is never copied to
    the device at once). Everything is computed relative to the image's first spectrum (which
    removes a large common offset exactly), and each chunk's centred statistics are merged into the
    running ones with the pairwise update of Chan, Golub and LeVeque; this stays accurate in
    float32 for hundreds of thousands of spectra.

    Args:
      spectra: ``(n, C)`` array (NumPy or JAX, any float dtype; computed in float32), ``n >= 2``.
      covariance: the full ``(C, C)`` covariance, else only the per-channel variance.
      chunk_size: rows per chunk.

    Returns:
      `SpectraStatistics` of the spectra.
    """
    shape = np.shape(spectra)
    if len(shape) != 2 or shape[0] < 2:
        raise ValueError(f"spectra must have the shape (n, C) with n >= 2, got {shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n, channels = shape
    chunk_size = min(chunk_size, n)
    spread_shape = (channels, channels) if covariance else (channels,)
    reference = np.asarray(spectra[0], np.float32)
    stats = SpectraStatistics(jnp.float32(0), jnp.zeros(channels, jnp.float32),
                              jnp.zeros(spread_shape, jnp.float32))
    for start in range(0, n, chunk_size):
        chunk = np.asarray(spectra[start:start + chunk_size])
        rows = chunk.shape[0]
        if rows < chunk_size:  # one compiled shape for every chunk: pad the last one
            chunk = np.pad(chunk, ((0, chunk_size - rows), (0, 0)))
        stats = _merge_chunk(stats, chunk, rows, reference, covariance=covariance)
    count, shifted_mean, sum_squares = stats
    return SpectraStatistics(count, reference + shifted_mean, sum_squares / (count - 1))


@functools.partial(jax.jit, static_argnames="covariance")
def _merge_chunk(stats: SpectraStatistics, chunk, rows, reference, *,
                 covariance: bool) -> SpectraStatistics:
    """Merges the first `rows` rows of ``chunk - reference`` into (count, mean, sum of squares)."""
    chunk = chunk.astype(jnp.float32) - reference
    in_chunk = (jnp.arange(chunk.shape[0]) < rows)[:, None]
    chunk_count = jnp.asarray(rows, jnp.float32)
    chunk_mean = jnp.sum(jnp.where(in_chunk, chunk, 0), axis=0) / chunk_count
    centred = jnp.where(in_chunk, chunk - chunk_mean, 0)
    if covariance:
        chunk_squares = jnp.dot(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
    else:
        chunk_squares = jnp.sum(centred * centred, axis=0)
    count, mean, squares = stats
    total = count + chunk_count
    delta = chunk_mean - mean
    correction = delta[:, None] * delta if covariance else delta * delta
    return SpectraStatistics(
        total,
        mean + delta * (chunk_count / total),
        squares + chunk_squares + correction * (count * chunk_count / total),
    )


def moment_matching_loss(weights, bias, source_mean, source_covariance, target_mean, target_std):
    """The A2 loss of the map ``x W + b`` from the source statistics alone.

    Args:
      weights: ``(C, C)`` W.
      bias: ``(C,)`` b.
      source_mean: ``(C,)`` mean of the source spectra.
      source_covariance: ``(C, C)`` unbiased covariance of the source spectra.
      target_mean: ``(C,)`` mean of the target spectra.
      target_std: ``(C,)`` unbiased standard deviation of the target spectra.

    Returns:
      ``mean_c (mean(Y) - target_mean)^2 + mean_c (std(Y) - target_std)^2`` for
      ``Y = X W + b``, a scalar.
    """
    mapped_mean = jnp.dot(source_mean, weights, precision=jax.lax.Precision.HIGHEST) + bias
    mapped_variance = _mapped_variance(weights, source_covariance)
    # A constant channel has zero variance, where sqrt has no gradient; keep it finite there.
    mapped_std = jnp.sqrt(jnp.maximum(mapped_variance, jnp.finfo(jnp.float32).tiny))
    return (jnp.mean((mapped_mean - target_mean) ** 2)
            + jnp.mean((mapped_std - target_std) ** 2))


@jax.custom_vjp
def _mapped_variance(weights, covariance):
    """``diag(W^T Sigma W)``: the per-channel variance of ``X W`` for a symmetric ``Sigma``."""
    return _mapped_variance_fwd(weights, covariance)[0]


def _mapped_variance_fwd(weights, covariance):
    covariance_weights = jnp.dot(covariance, weights, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(weights * covariance_weights, axis=0), covariance_weights


def _mapped_variance_bwd(covariance_weights, cotangent):
    # d/dW sum_j g_j (W^T S W)_jj = 2 S W diag(g): reuses the forward product (autodiff would
    # compute S (W diag(g)) again). The covariance is data, not a parameter: no cotangent.
    return 2 * covariance_weights * cotangent, None


_mapped_variance.defvjp(_mapped_variance_fwd, _mapped_variance_bwd)


@functools.partial(jax.jit, static_argnames=("mode", "steps", "learning_rate"))
def _fit_pairs(source_mean, source_covariance, target_mean, target_std, *, mode: str, steps: int,
               learning_rate: float):
    """Fits a stack of pairs (leading axis) with Adam; returns (W, b, last loss) per pair."""
    channels = source_mean.shape[-1]
    optimizer = optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)

    def fit_one(mean, cov, t_mean, t_std):
        params = {}
        if mode != "bias":
            params["weights"] = jnp.eye(channels, dtype=jnp.float32)
        if mode != "weights":
            params["bias"] = jnp.zeros(channels, jnp.float32)

        def loss_fn(p):
            return moment_matching_loss(p.get("weights", jnp.eye(channels, dtype=jnp.float32)),
                                        p.get("bias", jnp.zeros(channels, jnp.float32)),
                                        mean, cov, t_mean, t_std)

        def step(carry, _):
            p, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, state = optimizer.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None,
                                           length=steps)
        return (params.get("weights", jnp.eye(channels, dtype=jnp.float32)),
                params.get("bias", jnp.zeros(channels, jnp.float32)), losses[-1])

    return jax.vmap(fit_one)(source_mean, source_covariance, target_mean, target_std)


def fit_projections(source: Sequence, target: Sequence, *, mode: str = "weights+bias",
                    steps: int = 100, learning_rate: float = 0.01, chunk_size: int = 64,
                    pixel_chunk_size: int = 16384):
    """Fits one affine map ``y = x W + b`` for every (source image, target image) pair.

    Pairs are ordered source-major: pair ``i * len(target) + j`` maps the spectra of
    ``source[i]`` onto those of ``target[j]``. The result equals fitting every pair on its pixels
    with the loss and optimiser of ``method.md`` A2 (up to float32 rounding), but each image is
    read once into its statistics and the pairs are fitted `chunk_size` at a time with `jax.vmap`.

    Args:
      source: sequence of ``(n_i, C)`` spectra arrays, one per physiological image (``n_i >= 2``).
      target: sequence of ``(m_j, C)`` spectra arrays, one per pathological image.
      mode: ``"weights+bias"`` (fit W and b), ``"weights"`` (b stays 0) or ``"bias"`` (W stays I).
      steps: number of full-batch Adam steps per pair.
      learning_rate: Adam learning rate.
      chunk_size: pairs fitted together; bounds memory (about ``chunk_size * C * C`` floats
        several times over).
      pixel_chunk_size: rows per chunk when reading an image into its statistics.

    Returns:
      ``(W, b, losses)``: float32 arrays of shapes ``(P, C, C)``, ``(P, C)`` and ``(P,)`` with
      ``P = len(source) * len(target)``; ``losses`` holds each pair's loss computed in the last
      step, before its update (as the reference reports it).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not source or not target:
        raise ValueError(f"need at least one source and one target image, got {len(source)} "
                         f"and {len(target)}")
    if steps < 1 or chunk_size < 1:
        raise ValueError(f"steps and chunk_size must be positive, got {steps} and {chunk_size}")
    channels = {np.shape(x)[-1] for x in [*source, *target]}
    if len(channels) != 1:
        raise ValueError(f"all spectra must have the same number of channels, got {channels}")

    sources = _stack([spectra_statistics(x, chunk_size=pixel_chunk_size) for x in source])
    targets = _stack([spectra_statistics(x, covariance=False, chunk_size=pixel_chunk_size)
                      for x in target])
    target_std = jnp.sqrt(targets.spread)
    num_pairs = len(source) * len(target)
    chunk_size = min(chunk_size, num_pairs)
    results = []
    for start in range(0, num_pairs, chunk_size):
        # The last chunk repeats pair 0 to keep one compiled shape; its extra results are dropped.
        pairs = np.arange(start, start + chunk_size)
        pairs = np.where(pairs < num_pairs, pairs, 0)
        i, j = pairs // len(target), pairs % len(target)
        fitted = _fit_pairs(sources.mean[i], sources.spread[i], targets.mean[j], target_std[j],
                            mode=mode, steps=steps, learning_rate=learning_rate)
        results.append([x[:num_pairs - start] for x in fitted])
    weights, bias, losses = (jnp.concatenate(parts) for parts in zip(*results, strict=True))
    return weights, bias, losses


def _stack(statistics: list[SpectraStatistics]) -> SpectraStatistics:
    return SpectraStatistics(*(jnp.stack(parts) for parts in zip(*statistics, strict=True)))
