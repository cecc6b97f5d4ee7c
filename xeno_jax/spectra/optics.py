"""Tissue optics: optical properties from physiology, and diffuse reflectance.

Absorption follows Jacques (2013): blood (oxy/deoxy haemoglobin), water, fat, melanin, a small
bloodless baseline and ICG bound to plasma proteins. Reduced scattering is the power law
``mus'(lambda) = a (lambda / 500 nm)^-b``. Reflectance of a semi-infinite medium comes from the
vendored adding-doubling table ``R(a')`` of the reduced albedo ``a' = mus' / (mua + mus')``
(n = 1.4, g = 0.9, diffuse part without the surface's specular reflection).

For speed the table is resampled once onto a uniform grid of ``x = ln(mua / mus')``, so a lookup
is one index computation and one gather, with no search; it is piecewise linear in x and thus
differentiable almost everywhere. ``reflectance_from_albedo`` evaluates the table itself.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from xeno_jax.spectra.chromophores import BandSpectra, read_table

LOG_RATIO_MIN = float(np.log(1e-6))
LOG_RATIO_MAX = float(np.log(1e4))
LOG_RATIO_POINTS = 4096
_LOG_INTERP_ALBEDO = 0.9  # above it the table is interpolated in log10(1 - a')


class Tissue(NamedTuple):
    """Physiological parameters of tissue; each field broadcasts against the others.

    Attributes:
      blood: blood volume fraction B.
      saturation: oxygen saturation S of that blood, 0..1.
      water, fat: volume fractions.
      melanin: volume fraction of melanosomes.
      icg_molar: ICG concentration in plasma, mol/L.
      scatter_amplitude: mus' at 500 nm, cm^-1.
      scatter_power: power-law exponent b.
      hemoglobin_g_l: haemoglobin concentration of whole blood, g/L.
      hematocrit: volume fraction of red cells in blood (plasma is 1 - hematocrit).
    """

    blood: jnp.ndarray
    saturation: jnp.ndarray
    water: jnp.ndarray
    fat: jnp.ndarray
    melanin: jnp.ndarray
    icg_molar: jnp.ndarray
    scatter_amplitude: jnp.ndarray
    scatter_power: jnp.ndarray
    hemoglobin_g_l: jnp.ndarray
    hematocrit: jnp.ndarray


def absorption_basis(spectra: BandSpectra) -> np.ndarray:
    """Rows: HbO2 and Hb per g/L, water, fat, melanin, ICG per mol/L, baseline; ``(7, C)``."""
    return np.stack([
        spectra.mua_hbo2_per_g_l, spectra.mua_hb_per_g_l, spectra.mua_water, spectra.mua_fat,
        spectra.mua_melanin, spectra.mua_icg_per_molar, spectra.mua_baseline,
    ])


def absorption_weights(t: Tissue) -> jnp.ndarray:
    """Per-chromophore weights ``(..., 7)`` matching the rows of `absorption_basis`."""
    hb = t.blood * t.hemoglobin_g_l
    fields = [
        hb * t.saturation, hb * (1 - t.saturation), t.water, t.fat, t.melanin,
        t.blood * (1 - t.hematocrit) * t.icg_molar, jnp.ones_like(hb),
    ]
    return jnp.stack(jnp.broadcast_arrays(*fields), axis=-1)


def absorption(t: Tissue, spectra: BandSpectra) -> jnp.ndarray:
    """Absorption coefficient mua, cm^-1, shape ``(..., C)``."""
    return absorption_weights(t) @ jnp.asarray(absorption_basis(spectra), jnp.float32)


def reduced_scattering(amplitude, power, wavelength_nm) -> jnp.ndarray:
    """mus'(lambda) = amplitude * (lambda / 500 nm)^-power, cm^-1, shape ``(..., C)``."""
    log_rel = jnp.log(jnp.asarray(wavelength_nm, jnp.float32) / 500.0)
    return jnp.exp(jnp.log(jnp.asarray(amplitude))[..., None]
                   - jnp.asarray(power)[..., None] * log_rel)


def lut_path() -> Path:
    return Path(str(resources.files("xeno_jax.spectra") / "data" / "reflectance_lut.csv"))


@functools.cache
def reflectance_table() -> tuple[np.ndarray, np.ndarray]:
    """The vendored adding-doubling table: reduced albedo and diffuse reflectance."""
    table = read_table(lut_path())
    albedo, refl = table["a_reduced"], table["R_diffuse_excl_specular"]
    if albedo[0] != 0 or albedo[-1] != 1 or np.any(np.diff(albedo) <= 0):
        raise ValueError(f"{lut_path()}: a_reduced must increase strictly from 0 to 1")
    if np.any(np.diff(refl) <= 0):
        raise ValueError(f"{lut_path()}: reflectance must increase strictly with a_reduced")
    return albedo, refl


def _albedo_to_reflectance_np(a: np.ndarray) -> np.ndarray:
    albedo, refl = reflectance_table()
    a = np.clip(np.asarray(a, np.float64), 0.0, 1.0)
    linear = np.interp(a, albedo, refl)
    tail = albedo >= _LOG_INTERP_ALBEDO
    # 1 - a' spans six decades near a' = 1: interpolate there in log10(1 - a'), as the table's
    # own verification recommends (error below 3e-6 instead of 5e-5).
    log_gap = np.log10(np.maximum(1 - albedo[tail][:-1], 1e-300))
    log_a = np.log10(np.maximum(1 - a, 1e-12))
    in_tail = (a >= _LOG_INTERP_ALBEDO) & (a < albedo[tail][-2])
    logged = np.interp(-log_a, -log_gap, refl[tail][:-1])
    return np.where(in_tail, logged, linear)


def reflectance_from_albedo(a_reduced) -> jnp.ndarray:
    """Diffuse reflectance R(a') straight from the vendored table (NumPy float64 or JAX)."""
    if isinstance(a_reduced, np.ndarray | float | int):
        return _albedo_to_reflectance_np(np.asarray(a_reduced))
    albedo, refl = reflectance_table()
    return jnp.interp(a_reduced, jnp.asarray(albedo), jnp.asarray(refl))


@functools.cache
def _log_ratio_table() -> np.ndarray:
    x = np.linspace(LOG_RATIO_MIN, LOG_RATIO_MAX, LOG_RATIO_POINTS)
    return _albedo_to_reflectance_np(1.0 / (1.0 + np.exp(x))).astype(np.float32)


def reflectance_from_log_ratio(log_ratio) -> jnp.ndarray:
    """R as a function of ``x = ln(mua / mus')`` (uniform-grid lookup, clamped at the ends)."""
    table = jnp.asarray(_log_ratio_table())
    scale = (LOG_RATIO_POINTS - 1) / (LOG_RATIO_MAX - LOG_RATIO_MIN)
    u = jnp.clip((log_ratio - LOG_RATIO_MIN) * scale, 0.0, LOG_RATIO_POINTS - 1.001)
    i = u.astype(jnp.int32)
    lo = table[i]
    return lo + (u - i) * (table[i + 1] - lo)


def diffuse_reflectance(mua, musp) -> jnp.ndarray:
    """Diffuse reflectance of a semi-infinite medium from mua and mus' (cm^-1)."""
    return reflectance_from_log_ratio(jnp.log(mua) - jnp.log(musp))


def tissue_reflectance(t: Tissue, spectra: BandSpectra) -> jnp.ndarray:
    """Diffuse reflectance ``(..., C)`` of homogeneous tissue with parameters `t`."""
    mua = absorption(t, spectra)
    log_rel = jnp.log(jnp.asarray(spectra.wavelength_nm, jnp.float32) / 500.0)
    log_musp = (jnp.log(jnp.asarray(t.scatter_amplitude))[..., None]
                - jnp.asarray(t.scatter_power)[..., None] * log_rel)
    return reflectance_from_log_ratio(jnp.log(mua) - log_musp)
