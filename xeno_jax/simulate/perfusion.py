"""Perfusion states as species-agnostic transforms of physiological tissue parameters.

Every species goes through the same functions; only the response parameters stored on the
`Species` (saturation floor, blood-volume drop, ICG kinetics and binding, ...) differ, drawn per
image where they are ranges. Severity ``s`` in [0, 1] scales the change (``docs/tissue_optics.md``
section 5.4):

- malperfusion (arterial clamp): ``S' = S_min + (S - S_min)(1 - s)``, ``B' = B (1 - drop s)``,
  scattering power ``b' = b (1 - 0.18 s)`` (Nadeau et al. 2013), water ``+0.02 s`` (oedema);
- venous congestion: ``B' = B (1 + gain s)``, saturation falls towards 0.08-0.2, water ``+0.03 s``;
- ICG: plasma concentration ``c(t) = D / (V_plasma M_ICG) exp(-ln2 t / t_half)`` everywhere
  blood flows, plus a hepatic uptake compartment in liver peaking after 10-20 minutes.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp

from xeno_jax.simulate.species import Species
from xeno_jax.spectra.chromophores import ICG_MOLAR_MASS_G_PER_MOL


class PerfusionState(enum.IntEnum):
    PHYSIOLOGICAL = 0
    MALPERFUSION = 1
    VENOUS_CONGESTION = 2
    ICG = 3


STATE_NAMES = tuple(s.name.lower() for s in PerfusionState)

LIVER_UPTAKE_RATE_PER_MIN = 0.15
LIVER_EXCRETION_RATE_PER_MIN = 0.06


def state_index(name: str) -> int:
    try:
        return STATE_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown perfusion state {name!r}; known: {STATE_NAMES}") from None


def plasma_icg_molar(species: Species, dose_mg_kg, minutes):
    """ICG concentration in plasma (mol/L) ``minutes`` after a bolus of ``dose_mg_kg``."""
    initial = dose_mg_kg / species.plasma_volume_l_kg / ICG_MOLAR_MASS_G_PER_MOL * 1e-3
    return initial * jnp.exp(-jnp.log(2.0) * minutes / species.icg_half_life_min)


def liver_icg_molar(species: Species, dose_mg_kg, minutes):
    """Plasma-equivalent ICG held by hepatocytes (uptake minus biliary excretion)."""
    initial = dose_mg_kg / species.plasma_volume_l_kg / ICG_MOLAR_MASS_G_PER_MOL * 1e-3
    ku, kb = LIVER_UPTAKE_RATE_PER_MIN, LIVER_EXCRETION_RATE_PER_MIN
    shape = ku / (ku - kb) * (jnp.exp(-kb * minutes) - jnp.exp(-ku * minutes))
    return species.icg_liver_uptake * initial * shape


def apply_state(response, params: dict, *, species: Species, state, severity, minutes,
                dose_mg_kg, affected, is_liver) -> tuple[dict, dict]:
    """Transforms physiological parameter maps into the given perfusion state.

    Args:
      response: two uniform [0, 1) draws placing this image's saturation floors (ischemia,
        congestion) within the species' ranges.
      params: maps (H, W) ``blood``, ``saturation``, ``water``, ``scatter_power``, ``icg_molar``.
      species: the species (response parameters).
      state: `PerfusionState` (traced int).
      severity: 0..1 (malperfusion and congestion).
      minutes: time since ICG injection.
      dose_mg_kg: ICG dose.
      affected: bool (H, W), pixels the state acts on.
      is_liver: bool (H, W), pixels with hepatic ICG uptake.

    Returns:
      The transformed maps and scalar metadata of the drawn response.
    """
    lo, hi = species.ischemia_sto2_range
    ischemic_floor = lo + (hi - lo) * response[0]
    lo, hi = species.congestion_sto2_range
    congested_floor = lo + (hi - lo) * response[1]

    b, s, w = params["blood"], params["saturation"], params["water"]
    power = params["scatter_power"]
    sev = jnp.clip(severity, 0.0, 1.0)

    malperfused = {
        "blood": b * (1 - species.ischemia_blood_drop * sev),
        "saturation": ischemic_floor + (s - ischemic_floor) * (1 - sev),
        "water": w + species.ischemia_water_gain * sev,
        "scatter_power": power * (1 - species.ischemia_scatter_drop * sev),
    }
    congested = {
        "blood": b * (1 + species.congestion_blood_gain * sev),
        "saturation": congested_floor + (s - congested_floor) * (1 - sev),
        "water": w + 0.03 * sev,
        "scatter_power": power,
    }
    plasma = plasma_icg_molar(species, dose_mg_kg, minutes)
    icg = jnp.where(is_liver, plasma + liver_icg_molar(species, dose_mg_kg, minutes), plasma)

    out = dict(params)
    for name in ("blood", "saturation", "water", "scatter_power"):
        changed = jnp.select(
            [state == PerfusionState.MALPERFUSION, state == PerfusionState.VENOUS_CONGESTION],
            [malperfused[name], congested[name]], params[name])
        out[name] = jnp.where(affected, changed, params[name])
    out["icg_molar"] = jnp.where(affected & (state == PerfusionState.ICG), icg,
                                 params["icg_molar"])
    out["saturation"] = jnp.clip(out["saturation"], 0.0, 1.0)
    out["water"] = jnp.clip(out["water"], 0.0, 0.98)
    is_icg = state == PerfusionState.ICG
    metadata = {
        "sto2_floor": jnp.where(state == PerfusionState.MALPERFUSION, ischemic_floor,
                                jnp.where(state == PerfusionState.VENOUS_CONGESTION,
                                          congested_floor, jnp.nan)),
        "icg_plasma_molar": jnp.where(is_icg, plasma, 0.0),
    }
    return out, metadata
