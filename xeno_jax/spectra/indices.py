"""Tivita-style tissue indices: StO2, NIR perfusion index (NPI), THI and TWI.

The official algorithms are proprietary; these follow the published band definitions (Holmer et
al., Biomed Tech 63:547, 2018) with the scaling constants of the open MIT re-implementation
``morrocoy/hsi`` (HSOpenTivita). All work on absorbance ``A = -ln R`` of reflectance spectra on
the last axis, are linear maps plus a few elementwise operations (jittable), and are clipped to
[0, 1] like the camera's parameter images. They are read-outs, not simulator inputs.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from scipy.signal import savgol_coeffs

from xeno_jax.spectra.bands import BandGrid

_MIN_REFLECTANCE = 1e-6
STO2_R0, STO2_R1 = 1.0, 0.15


def _band_mask(grid: BandGrid, lo: float, hi: float) -> np.ndarray:
    centers = grid.centers
    mask = (centers >= lo) & (centers <= hi)
    if not mask.any():
        raise ValueError(f"no band of {grid} lies in {lo}-{hi} nm")
    return mask


@functools.cache
def _mean_weights(grid: BandGrid, lo: float, hi: float) -> np.ndarray:
    mask = _band_mask(grid, lo, hi).astype(np.float32)
    return mask / mask.sum()


@functools.cache
def _second_derivative(grid: BandGrid) -> np.ndarray:
    """Matrix D with ``A @ D`` = Savitzky-Golay (window 5, order 3) second derivative of A."""
    c = grid.num_bands
    d = np.zeros((c, c), np.float32)
    for j in range(c):
        start = int(np.clip(j - 2, 0, c - 5))  # edges use the nearest full window
        d[start:start + 5, j] = savgol_coeffs(5, 3, deriv=2, pos=j - start, use="dot")
    return d


def absorbance(reflectance):
    return -jnp.log(jnp.maximum(reflectance, _MIN_REFLECTANCE))


def _ratio(reflectance, grid, num, den):
    a = absorbance(reflectance)
    return (a @ _mean_weights(grid, *num)) / (a @ _mean_weights(grid, *den))


def sto2(reflectance, grid: BandGrid = BandGrid()):
    """Oxygen saturation index from the minima of the second derivative of absorbance."""
    d2 = absorbance(reflectance) @ _second_derivative(grid)
    v0 = jnp.min(jnp.where(_band_mask(grid, 570, 590), d2, jnp.inf), axis=-1) / STO2_R0
    v1 = jnp.min(jnp.where(_band_mask(grid, 740, 780), d2, jnp.inf), axis=-1) / STO2_R1
    total = v0 + v1
    value = jnp.where(total != 0, v0 / jnp.where(total != 0, total, 1), 0)
    return jnp.clip(value, 0, 1)


def nir_perfusion_index(reflectance, grid: BandGrid = BandGrid()):
    """NIR perfusion index: absorbance 825-925 nm over 655-735 nm, scaled by 1/1.9."""
    return jnp.clip(_ratio(reflectance, grid, (825, 925), (655, 735)) / 1.9, 0, 1)


def thi(reflectance, grid: BandGrid = BandGrid()):
    """Tissue haemoglobin index: absorbance 530-590 nm over 785-825 nm, (ratio - 1.3) / 1.7."""
    return jnp.clip((_ratio(reflectance, grid, (530, 590), (785, 825)) - 1.3) / 1.7, 0, 1)


def twi(reflectance, grid: BandGrid = BandGrid()):
    """Tissue water index: absorbance 955-980 nm over 880-900 nm, (ratio - 0.4) / 1.6."""
    return jnp.clip((_ratio(reflectance, grid, (955, 980), (880, 900)) - 0.4) / 1.6, 0, 1)
