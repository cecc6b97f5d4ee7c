"""Geometric augmentations applied alike to spectra, labels and valid masks (``method.md`` A4).

Each op draws its parameters per image and applies the same parameters to the features (``(B, H,
W, C)``, bilinear), the labels and the valid mask (``(B, H, W)``, nearest, so labels stay labels).
Coordinates are pixel centres (the top-left pixel is at 0, the bottom-right at ``size - 1``) and
points outside the image are reflected about the border pixels; so an affine map with zero angle,
zero shift and unit scale is exactly the identity, and unselected images come back bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def random_affine(key: jax.Array, features: jax.Array, labels: jax.Array, valid: jax.Array, *,
                  p: float = 0.5, degrees: float = 45.0, translate: float = 0.0625,
                  scale: tuple[float, float] = (0.9, 1.1)):
    """Random rotation, translation and scaling about the image centre, per image with prob. `p`.

    As Kornia's ``RandomAffine(degrees, translate=(t, t), scale)``: angle ``~ U[-degrees,
    degrees]``, shifts ``~ U[-t W, t W]`` and ``U[-t H, t H]`` pixels, one isotropic scale ``~
    U[scale]``; reflection padding.

    Args:
      key: PRNG key.
      features: ``(B, H, W, C)`` float.
      labels: ``(B, H, W)`` int.
      valid: ``(B, H, W)`` bool.
      p: probability that an image is transformed.
      degrees: largest rotation in degrees.
      translate: largest shift as a fraction of the image size.
      scale: range of the scale factor.

    Returns:
      ``(features, labels, valid)`` with the shapes and dtypes of the inputs.
    """
    check_batch(features, labels, valid)
    height, width = features.shape[1:3]
    selected, angle, shift, factor = draw_affine(
        key, features.shape[0], height, width, p=p, degrees=degrees, translate=translate,
        scale=scale)
    warped = jax.vmap(affine_warp)(features, labels, valid, angle, shift, factor)
    return tuple(jnp.where(selected.reshape((-1,) + (1,) * (x.ndim - 1)), w, x)
                 for w, x in zip(warped, (features, labels, valid), strict=True))


def draw_affine(key: jax.Array, batch: int, height: int, width: int, *, p: float = 0.5,
                degrees: float = 45.0, translate: float = 0.0625,
                scale: tuple[float, float] = (0.9, 1.1)):
    """The random parameters of `random_affine`: ``(selected, angle, shift, factor)`` per image."""
    keys = jax.random.split(key, 4)
    selected = jax.random.bernoulli(keys[0], p, (batch,))
    angle = jnp.deg2rad(jax.random.uniform(keys[1], (batch,), minval=-degrees, maxval=degrees))
    shift = jax.random.uniform(keys[2], (batch, 2), minval=-translate, maxval=translate)
    shift = shift * jnp.array([height, width], jnp.float32)
    factor = jax.random.uniform(keys[3], (batch,), minval=scale[0], maxval=scale[1])
    return selected, angle, shift, factor


def affine_then_flips(keys: Sequence[jax.Array], features: jax.Array, labels: jax.Array,
                      valid: jax.Array, *, affine: Mapping[str, Any] | None,
                      flips: Sequence[tuple[str, Mapping[str, Any]]]):
    """`random_affine`, then random flips, as one gather per image (the same result).

    Flips move pixel centres onto pixel centres, so flipping the output of an affine warp is
    the same warp sampled at flipped output coordinates. Run one after the other, XLA on a CPU
    fuses the bilinear gathers into every flip and transplantation select and recomputes them
    (a pipeline 10 to 20 times slower than its steps); composed, the gather happens once.
    Labels and masks come out identical; features up to float rounding.

    Args:
      keys: one key per step, as the steps would get them applied one by one.
      features, labels, valid: the batch.
      affine: `random_affine` keyword arguments, or None without an affine step.
      flips: ``("hflip" | "vflip", {"p": ...})`` in order.

    Returns:
      ``(features, labels, valid)``.
    """
    check_batch(features, labels, valid)
    batch, height, width = labels.shape
    keys = list(keys)
    if affine is not None:
        selected, angle, shift, factor = draw_affine(keys.pop(0), batch, height, width, **affine)
        angle = jnp.where(selected, angle, 0.0)
        shift = jnp.where(selected[:, None], shift, 0.0)
        factor = jnp.where(selected, factor, 1.0)
    else:
        angle, shift, factor = jnp.zeros(batch), jnp.zeros((batch, 2)), jnp.ones(batch)
    flip = {"hflip": jnp.zeros(batch, bool), "vflip": jnp.zeros(batch, bool)}
    for key, (name, kwargs) in zip(keys, flips, strict=True):
        flip[name] = flip[name] ^ draw_flip(key, batch, **kwargs)
    return jax.vmap(affine_warp)(features, labels, valid, angle, shift, factor, flip["vflip"],
                                 flip["hflip"])


def affine_warp(features: jax.Array, labels: jax.Array, valid: jax.Array, angle: jax.Array,
                shift: jax.Array, scale: jax.Array, flip_rows: jax.Array | bool = False,
                flip_cols: jax.Array | bool = False):
    """Warps one image: output pixel q shows input point ``R(-angle) (q - c - shift) / scale + c``.

    With `flip_rows` / `flip_cols`, q is first mirrored (top-bottom / left-right): the warp
    followed by flips.

    Args:
      features: ``(H, W, C)``, sampled bilinearly.
      labels: ``(H, W)``, sampled at the nearest pixel.
      valid: ``(H, W)``, sampled at the nearest pixel.
      angle: rotation in radians (counter-clockwise in (x, y) with y pointing down: clockwise on
        screen).
      shift: ``(2,)`` translation (rows, columns) in pixels.
      scale: scale factor (> 1 enlarges).
      flip_rows, flip_cols: mirror the output top-bottom / left-right.

    Returns:
      ``(features, labels, valid)`` of the warped image.
    """
    height, width = labels.shape
    centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
    rows = jnp.where(flip_rows, height - 1 - rows, rows)
    cols = jnp.where(flip_cols, width - 1 - cols, cols)
    v = rows - centre[0] - shift[0]
    u = cols - centre[1] - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source_col = _reflect((cos * u + sin * v) / scale + centre[1], width)
    source_row = _reflect((cos * v - sin * u) / scale + centre[0], height)

    nearest = _flat_index(jnp.round(source_row), jnp.round(source_col), height, width)
    labels = labels.reshape(-1)[nearest].reshape(height, width)
    valid = valid.reshape(-1)[nearest].reshape(height, width)

    row0, col0 = jnp.floor(source_row), jnp.floor(source_col)
    fraction_row = (source_row - row0)[..., None]
    fraction_col = (source_col - col0)[..., None]
    flat = features.reshape(height * width, -1)

    def sample(row, col):
        return flat[_flat_index(row, col, height, width)].reshape(features.shape)

    top = (1 - fraction_col) * sample(row0, col0) + fraction_col * sample(row0, col0 + 1)
    bottom = (1 - fraction_col) * sample(row0 + 1, col0) + fraction_col * sample(row0 + 1,
                                                                                 col0 + 1)
    warped = (1 - fraction_row) * top + fraction_row * bottom
    return warped.astype(features.dtype), labels, valid


def random_horizontal_flip(key: jax.Array, features: jax.Array, labels: jax.Array,
                           valid: jax.Array, *, p: float = 0.25):
    """Mirrors each image left-right with probability `p`; returns ``(features, labels, valid)``."""
    return _random_flip(key, features, labels, valid, p=p, axis=2)


def random_vertical_flip(key: jax.Array, features: jax.Array, labels: jax.Array,
                         valid: jax.Array, *, p: float = 0.25):
    """Mirrors each image top-bottom with probability `p`; returns ``(features, labels, valid)``."""
    return _random_flip(key, features, labels, valid, p=p, axis=1)


def draw_flip(key: jax.Array, batch: int, *, p: float = 0.25) -> jax.Array:
    """Which images a random flip mirrors: bool ``(batch,)``."""
    return jax.random.bernoulli(key, p, (batch,))


def _random_flip(key, features, labels, valid, *, p: float, axis: int):
    check_batch(features, labels, valid)
    flip = draw_flip(key, features.shape[0], p=p)

    def maybe_flip(x):
        return jnp.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.flip(x, axis), x)

    return maybe_flip(features), maybe_flip(labels), maybe_flip(valid)


def check_batch(features: jax.Array, labels: jax.Array, valid: jax.Array) -> None:
    """Raises a ValueError unless features are (B, H, W, C) and labels, valid are (B, H, W)."""
    if features.ndim != 4 or labels.shape != features.shape[:3] or valid.shape != labels.shape:
        raise ValueError(f"expected features (B, H, W, C) and labels and valid (B, H, W), got "
                         f"{features.shape}, {labels.shape} and {valid.shape}")


def _reflect(coordinate: jax.Array, size: int) -> jax.Array:
    """Reflects coordinates about the border pixel centres 0 and ``size - 1``."""
    if size == 1:
        return jnp.zeros_like(coordinate)
    period = 2 * (size - 1)
    folded = jnp.mod(jnp.abs(coordinate), period)
    return jnp.where(folded > size - 1, period - folded, folded)


def _flat_index(row: jax.Array, col: jax.Array, height: int, width: int) -> jax.Array:
    """Flat index of (row, col), clipped into the image (a neighbour past the border pixel)."""
    row = jnp.clip(row, 0, height - 1).astype(jnp.int32)
    col = jnp.clip(col, 0, width - 1).astype(jnp.int32)
    return row * width + col
