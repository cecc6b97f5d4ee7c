"""Species: blood constants, organ-prior offsets, anatomy, and responses to perfusion states.

theta_pixel = prior(organ) (+) delta(species) (+) delta(species, organ) (+) subject (+) field,
as in ``docs/tissue_optics.md`` section 5.3. A `Species` is a pytree of arrays, so one jitted
generator serves every species (and species can be stacked for `vmap`). Pig is the reference:
its organ offsets are zero. Values are estimates ([est] in the optics notes) chosen so that
species differ in absolute spectra by about as much as organs differ from each other, while
perfusion states act through the same species-agnostic transform with species-specific
response parameters (minimum saturation, blood-volume drop, ICG kinetics and binding), which
makes the pathological change comparable but not identical across species.

Responses to perfusion states differ between species where physiology says they do; each is
a documented estimate with its source ([lit] literature, [est] estimate):

- ischemic saturation floor: pig kidney about 20 % under arterial occlusion (Nadeau et al.
  2013, SFDI) [lit]; rat lower and faster (about 4-5x the mass-specific metabolic rate of pig
  or human, Kleiber scaling) [est]; human malperfused kidneys reach the pig's floor (the
  paper's StO2 histograms: mostly 0.1-0.3 in every species) [lit];
- blood-volume and scattering drop: pig scattering power -18 % under occlusion (Nadeau et al.
  2013) [lit]; human transplant kidneys are perfused with preservation solution before
  implantation, so less blood is lost and more water gained (oedema) [est];
- venous congestion: kidney StO2 13.4 +- 3.1 % (Tivita, Studier-Fischer et al. 2024) [lit];
- ICG: plasma volume 40 (human), 42 (pig) and 35 (rat) mL/kg, half-life 3-4 min in humans
  (textbook), shorter in rats (faster hepatic clearance) [est]; the absorption peak of ICG
  shifts with the plasma protein it binds to (albumin and lipoprotein composition differ
  between species) [est].

`with_response_divergence` moves a target species' responses towards or away from a source
species' (the ``response_divergence`` knob of divergence sweeps).

New species: build one with `make_species` (see the README recipe) and `register_species` it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import struct

from xeno_jax.labels import SPECIES_12
from xeno_jax.simulate.materials import NUM_TISSUES, TISSUES


@struct.dataclass
class Species:
    """Species parameters (all arrays; per-tissue rows follow `materials.TISSUES`).

    Attributes:
      species_id: integer that seeds the species' subjects (distinct per species).
      hemoglobin_g_l, hematocrit: blood constants (subjects vary around them).
      saturation_offset: systemic saturation shift from haemoglobin O2 affinity (P50).
      blood_scale, saturation_shift, water_shift, fat_shift, scatter_scale, scatter_power_shift,
        pigment: per-tissue offsets applied to the pig-reference priors.
      organ_presence: probability that each of the 12 classes appears in an image (index 0
        and invalid tissues are always present).
      anatomy_scale: organ size relative to pig (pixels shrink with it at a fixed distance).
      bowel_diameter_mm: diameter of small-bowel loops.
      ischemia_sto2_range: (low, high) of the saturation floor reached under full ischemia.
      ischemia_blood_drop, ischemia_scatter_drop, ischemia_water_gain: malperfusion response.
      congestion_blood_gain, congestion_sto2_range: venous congestion response.
      plasma_volume_l_kg, icg_half_life_min, icg_peak_shift_nm, icg_liver_uptake: ICG.
      subject_sd: standard deviation of subject effects (log B, logit S, W, log a).
    """

    species_id: jnp.ndarray
    hemoglobin_g_l: jnp.ndarray
    hematocrit: jnp.ndarray
    saturation_offset: jnp.ndarray
    blood_scale: jnp.ndarray
    saturation_shift: jnp.ndarray
    water_shift: jnp.ndarray
    fat_shift: jnp.ndarray
    scatter_scale: jnp.ndarray
    scatter_power_shift: jnp.ndarray
    pigment: jnp.ndarray
    organ_presence: jnp.ndarray
    anatomy_scale: jnp.ndarray
    bowel_diameter_mm: jnp.ndarray
    ischemia_sto2_range: jnp.ndarray
    ischemia_blood_drop: jnp.ndarray
    ischemia_scatter_drop: jnp.ndarray
    ischemia_water_gain: jnp.ndarray
    congestion_blood_gain: jnp.ndarray
    congestion_sto2_range: jnp.ndarray
    plasma_volume_l_kg: jnp.ndarray
    icg_half_life_min: jnp.ndarray
    icg_peak_shift_nm: jnp.ndarray
    icg_liver_uptake: jnp.ndarray
    subject_sd: jnp.ndarray


def _per_tissue(values: dict[str, float], default: float) -> np.ndarray:
    unknown = set(values) - set(TISSUES)
    if unknown:
        raise ValueError(f"unknown tissues {sorted(unknown)}; known: {TISSUES}")
    return np.array([values.get(t, default) for t in TISSUES], np.float32)


def _per_class(values: dict[str, float]) -> np.ndarray:
    presence = np.ones(SPECIES_12.num_classes, np.float32)
    for name, p in values.items():
        index = SPECIES_12.name_to_index(name)
        if index == SPECIES_12.invalid_index or index == 0:
            raise ValueError(f"organ_presence: {name!r} is not an organ of SPECIES_12")
        presence[index] = p
    return presence


def make_species(
    species_id: int,
    *,
    hemoglobin_g_l: float,
    hematocrit: float,
    saturation_offset: float = 0.0,
    blood_scale: dict[str, float] | None = None,
    saturation_shift: dict[str, float] | None = None,
    water_shift: dict[str, float] | None = None,
    fat_shift: dict[str, float] | None = None,
    scatter_scale: dict[str, float] | None = None,
    scatter_power_shift: dict[str, float] | None = None,
    pigment: dict[str, float] | None = None,
    organ_presence: dict[str, float] | None = None,
    anatomy_scale: float = 1.0,
    bowel_diameter_mm: float = 30.0,
    ischemia_sto2_range: tuple[float, float] = (0.05, 0.25),
    ischemia_blood_drop: float = 0.3,
    ischemia_scatter_drop: float = 0.18,
    ischemia_water_gain: float = 0.02,
    congestion_blood_gain: float = 1.5,
    congestion_sto2_range: tuple[float, float] = (0.08, 0.2),
    plasma_volume_l_kg: float = 0.042,
    icg_half_life_min: float = 4.0,
    icg_peak_shift_nm: float = 0.0,
    icg_liver_uptake: float = 1.0,
    subject_sd: tuple[float, float, float, float] = (0.12, 0.15, 0.015, 0.06),
) -> Species:
    """Builds a `Species` from readable keyword arguments (per-tissue dicts by tissue name)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return Species(
        species_id=jnp.asarray(species_id, jnp.int32),
        hemoglobin_g_l=f32(hemoglobin_g_l),
        hematocrit=f32(hematocrit),
        saturation_offset=f32(saturation_offset),
        blood_scale=f32(_per_tissue(blood_scale or {}, 1.0)),
        saturation_shift=f32(_per_tissue(saturation_shift or {}, 0.0)),
        water_shift=f32(_per_tissue(water_shift or {}, 0.0)),
        fat_shift=f32(_per_tissue(fat_shift or {}, 0.0)),
        scatter_scale=f32(_per_tissue(scatter_scale or {}, 1.0)),
        scatter_power_shift=f32(_per_tissue(scatter_power_shift or {}, 0.0)),
        pigment=f32(_per_tissue(pigment or {}, 0.0)),
        organ_presence=f32(_per_class(organ_presence or {})),
        anatomy_scale=f32(anatomy_scale),
        bowel_diameter_mm=f32(bowel_diameter_mm),
        ischemia_sto2_range=f32(ischemia_sto2_range),
        ischemia_blood_drop=f32(ischemia_blood_drop),
        ischemia_scatter_drop=f32(ischemia_scatter_drop),
        ischemia_water_gain=f32(ischemia_water_gain),
        congestion_blood_gain=f32(congestion_blood_gain),
        congestion_sto2_range=f32(congestion_sto2_range),
        plasma_volume_l_kg=f32(plasma_volume_l_kg),
        icg_half_life_min=f32(icg_half_life_min),
        icg_peak_shift_nm=f32(icg_peak_shift_nm),
        icg_liver_uptake=f32(icg_liver_uptake),
        subject_sd=f32(subject_sd),
    )


PIG = make_species(
    1,
    hemoglobin_g_l=100.0,  # anaesthetised landrace pigs
    hematocrit=0.32,
    saturation_offset=-0.03,  # P50 about 33 mmHg
    pigment={},
    organ_presence={"stomach": 0.6, "small_bowel": 0.7, "colon": 0.6, "liver": 0.6,
                    "pancreas": 0.35, "kidney": 0.4, "spleen": 0.45, "omentum": 0.5,
                    "lung": 0.2, "skin": 0.8, "peritoneum": 0.8},
    anatomy_scale=1.0,
    bowel_diameter_mm=30.0,
    ischemia_sto2_range=(0.06, 0.22),
    ischemia_blood_drop=0.30,
    ischemia_scatter_drop=0.18,  # Nadeau et al. 2013, porcine kidney
    congestion_blood_gain=1.6,
    plasma_volume_l_kg=0.042,
    icg_half_life_min=4.5,
    icg_peak_shift_nm=5.0,
)

HUMAN = make_species(
    0,
    hemoglobin_g_l=135.0,  # surgical patients, often mildly anaemic
    hematocrit=0.40,
    saturation_offset=0.0,
    # Human serosa and organ capsules are thicker and fattier than in young pigs (more and
    # flatter scattering, more fat); liver steatosis and fatty pancreas are common.
    blood_scale={"stomach": 1.25, "small_bowel": 1.05, "liver": 0.8, "kidney": 1.2,
                 "spleen": 0.6, "omentum": 0.7, "lung": 1.3, "peritoneum": 1.5, "pancreas": 1.2},
    saturation_shift={"kidney": 0.06, "liver": 0.1, "spleen": 0.12, "stomach": 0.05,
                      "small_bowel": 0.04, "colon": 0.06, "lung": -0.12, "pancreas": 0.05},
    fat_shift={"liver": 0.18, "pancreas": 0.3, "omentum": 0.12, "peritoneum": 0.3,
               "colon": 0.1, "kidney": 0.1, "stomach": 0.08, "small_bowel": 0.06},
    water_shift={"liver": -0.12, "pancreas": -0.2, "peritoneum": -0.15, "kidney": -0.06,
                 "colon": -0.06, "stomach": -0.05},
    scatter_scale={"kidney": 1.5, "liver": 1.6, "stomach": 1.45, "colon": 1.4,
                   "small_bowel": 1.35, "spleen": 1.5, "pancreas": 1.3, "peritoneum": 1.4,
                   "omentum": 1.2},
    scatter_power_shift={"kidney": -0.35, "liver": -0.3, "stomach": -0.3, "spleen": -0.3,
                         "colon": -0.3, "small_bowel": -0.3, "pancreas": -0.3,
                         "peritoneum": -0.3, "skin": -0.1, "omentum": -0.2},
    # Lumped pigments: melanin of human skin, carbon in adult lungs (anthracosis), and a
    # melanin-shaped stand-in for the carotenoids that make human fat yellow.
    pigment={"skin": 0.01, "lung": 0.004, "omentum": 0.0015, "peritoneum": 0.001,
             "fat": 0.0015, "liver": 0.0008, "stomach": 0.0006},
    organ_presence={"stomach": 0.45, "small_bowel": 0.6, "colon": 0.55, "liver": 0.45,
                    "pancreas": 0.25, "kidney": 0.4, "spleen": 0.3, "omentum": 0.5,
                    "lung": 0.15, "skin": 0.7, "peritoneum": 0.75},
    anatomy_scale=0.95,
    bowel_diameter_mm=28.0,
    # (0.04, 0.16), was (0.12, 0.32): the paper's malperfused human kidneys show an StO2 index
    # mostly within 0.1-0.3, like pig and rat ones; the higher floor gave a median of 0.36.
    ischemia_sto2_range=(0.04, 0.16),
    # Cold-ischemic transplant kidneys: less blood-volume and scattering loss, more oedema.
    ischemia_blood_drop=0.10,
    ischemia_scatter_drop=0.05,
    ischemia_water_gain=0.08,
    congestion_blood_gain=1.4,
    plasma_volume_l_kg=0.040,
    icg_half_life_min=3.5,
    icg_peak_shift_nm=0.0,
)

RAT = make_species(
    2,
    hemoglobin_g_l=145.0,
    hematocrit=0.43,
    saturation_offset=-0.05,  # P50 about 37 mmHg
    # Thin walls of rat stomach and bowel let lumen content show through (pigment, less
    # scattering); small, translucent omentum; albino, shaved skin.
    blood_scale={"stomach": 1.4, "small_bowel": 1.5, "colon": 1.3, "liver": 1.3, "kidney": 1.4,
                 "spleen": 1.2, "omentum": 1.8, "skin": 0.6, "pancreas": 1.3},
    # Kidney +0.10 (was -0.03): the paper's rat kidneys, like pig and human ones, show a
    # physiological StO2 index mostly at or above 0.6; with -0.03 the simulated median was 0.45,
    # with +0.05 0.58, with +0.08 0.59-0.60 on sim_small 1.1.0 (the index reads lower below the
    # true S in rat kidney than in pig).
    saturation_shift={"kidney": 0.10, "small_bowel": -0.04, "colon": -0.05},
    fat_shift={"omentum": -0.3, "peritoneum": -0.08},
    water_shift={"omentum": 0.3},
    scatter_scale={"stomach": 0.7, "small_bowel": 0.65, "colon": 0.7, "omentum": 0.6,
                   "kidney": 0.8, "liver": 0.85, "skin": 1.1},
    scatter_power_shift={"stomach": 0.25, "small_bowel": 0.3, "colon": 0.25, "kidney": 0.2,
                         "liver": 0.2, "spleen": 0.2, "omentum": 0.3},
    pigment={"colon": 0.006, "small_bowel": 0.002, "stomach": 0.003},
    organ_presence={"stomach": 0.5, "small_bowel": 0.7, "colon": 0.6, "liver": 0.6,
                    "pancreas": 0.3, "kidney": 0.45, "spleen": 0.35, "omentum": 0.35,
                    "lung": 0.1, "skin": 0.8, "peritoneum": 0.7},
    anatomy_scale=0.45,
    bowel_diameter_mm=5.0,
    ischemia_sto2_range=(0.04, 0.18),
    ischemia_blood_drop=0.38,
    ischemia_scatter_drop=0.22,
    congestion_blood_gain=1.8,
    plasma_volume_l_kg=0.035,
    icg_half_life_min=2.5,
    icg_peak_shift_nm=-8.0,
    icg_liver_uptake=1.4,
)

_REGISTRY: dict[str, Species] = {"human": HUMAN, "pig": PIG, "rat": RAT}


def register_species(name: str, species: Species, *, overwrite: bool = False) -> None:
    """Makes `species` available by name (to `make_spec`, builders and configs)."""
    if not overwrite and name in _REGISTRY:
        raise ValueError(f"species {name!r} is already registered")
    ids = {int(s.species_id): n for n, s in _REGISTRY.items() if n != name}
    if int(species.species_id) in ids:
        raise ValueError(
            f"species_id {int(species.species_id)} of {name!r} is already used by "
            f"{ids[int(species.species_id)]!r}"
        )
    if species.blood_scale.shape != (NUM_TISSUES,):
        raise ValueError(f"species {name!r}: per-tissue arrays must have shape ({NUM_TISSUES},)")
    _REGISTRY[name] = species


def get_species(name: str) -> Species:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown species {name!r}; registered: {sorted(_REGISTRY)}") from None


def species_names() -> list[str]:
    return sorted(_REGISTRY)


def replace(species: Species, **changes) -> Species:
    """A copy of `species` with some fields replaced (arrays converted like `make_species`)."""
    return dataclasses.replace(species, **{k: jnp.asarray(v) for k, v in changes.items()})


# Response parameters of perfusion states, with the (low, high) range each is clipped to.
RESPONSE_LIMITS = {
    "ischemia_sto2_range": (0.01, 0.95),
    "ischemia_blood_drop": (0.0, 0.95),
    "ischemia_scatter_drop": (0.0, 0.9),
    "ischemia_water_gain": (0.0, 0.3),
    "congestion_blood_gain": (0.0, 5.0),
    "congestion_sto2_range": (0.01, 0.95),
    "plasma_volume_l_kg": (0.01, 0.1),
    "icg_half_life_min": (0.2, 60.0),
    "icg_peak_shift_nm": (-40.0, 40.0),
    "icg_liver_uptake": (0.0, 5.0),
}


def with_response_divergence(target: Species, source: Species,
                             response_divergence: float) -> Species:
    """`target` with its perfusion responses placed relative to `source`'s.

    Every response parameter (`RESPONSE_LIMITS`) becomes ``source + response_divergence *
    (target - source)``, clipped to its range: 0 gives the source species' responses on the
    target's physiology, 1 the target's documented defaults, above 1 responses further apart.
    Physiological parameters (priors, blood constants, anatomy) stay the target's.
    """
    if response_divergence < 0:
        raise ValueError(f"response_divergence must be >= 0, got {response_divergence}")
    changes = {}
    for name, (low, high) in RESPONSE_LIMITS.items():
        a, b = np.asarray(getattr(source, name)), np.asarray(getattr(target, name))
        value = np.clip(a + response_divergence * (b - a), low, high)
        changes[name] = np.sort(value) if value.ndim else value  # ranges stay (low, high)
    return replace(target, **changes)
