"""`generate`: one pure, jittable map from a key and a specification to a simulated image.

Sampling hierarchy (``docs/tissue_optics.md`` section 7): species constants and organ offsets ->
subject effects (seeded by species and subject, shared by all images of a subject) -> organ
means per image -> perfusion state (the same transform for every species) -> smooth spatial
fields and vessels per pixel -> absorption and scattering -> adding-doubling reflectance ->
shading, surface reflection, speculars -> sensor. Shapes are static (image size and camera are
static arguments); `generate_batch` vmaps over keys and stacked specifications.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from xeno_jax.labels import SPECIES_12
from xeno_jax.simulate import camera as camera_lib
from xeno_jax.simulate.draws import Draws
from xeno_jax.simulate.materials import (
    MATERIAL_LABEL,
    NUM_TISSUES,
    TISSUE_PRIOR_MEAN,
    TISSUE_PRIOR_SPREAD,
    TISSUES,
)
from xeno_jax.simulate.perfusion import PerfusionState, apply_state, state_index
from xeno_jax.simulate.scene import FIELD_OF_VIEW_MM, layout, smooth_field
from xeno_jax.simulate.species import Species, get_species
from xeno_jax.spectra.chromophores import BandSpectra, band_spectra
from xeno_jax.spectra.optics import reflectance_from_log_ratio

SUBJECT_SEED = 20_241_015
ICG_AGGREGATION_HALF_MOLAR = 30e-6  # H-aggregate fraction c / (c + c_half)  [est]
ICG_AGGREGATE_BLUE_SHIFT_NM = 105.0  # aggregate band near 700 nm instead of 805 nm
ICG_AGGREGATE_STRENGTH = 0.6
_LIVER = TISSUES.index("liver")


@struct.dataclass
class Spec:
    """What to simulate (all traced arrays, so specs can be stacked and vmapped).

    Attributes:
      species: the species' parameters.
      subject: subject number (seeds the subject effects).
      state: `PerfusionState` index.
      severity: 0..1 severity of malperfusion or congestion.
      minutes: time since the ICG bolus.
      icg_dose_mg_kg: ICG dose.
      focus: label index always present and central in the scene (-1: none).
      affected: bool (13,) per label index (incl. invalid 12), tissues a malperfusion or
        congestion acts on (ICG reaches all tissue).
    """

    species: Species
    subject: jnp.ndarray
    state: jnp.ndarray
    severity: jnp.ndarray
    minutes: jnp.ndarray
    icg_dose_mg_kg: jnp.ndarray
    focus: jnp.ndarray
    affected: jnp.ndarray


def make_spec(species: str | Species = "pig", subject: int = 0, state: str = "physiological",
              severity: float = 0.0, minutes: float = 0.0, icg_dose_mg_kg: float = 0.25,
              focus: str | None = None, affected: Sequence[str] = ("kidney",)) -> Spec:
    """A `Spec` from names (species, state, focus organ, affected organs)."""
    if isinstance(species, str):
        species = get_species(species)
    focus_index = -1 if focus is None else SPECIES_12.name_to_index(focus)
    if focus is not None and not 0 < focus_index < SPECIES_12.invalid_index:
        raise ValueError(f"focus must be an organ of SPECIES_12, got {focus!r}")
    mask = np.zeros(SPECIES_12.invalid_index + 1, bool)
    for name in affected:
        index = SPECIES_12.name_to_index(name)
        if index == SPECIES_12.invalid_index:
            raise ValueError(f"affected: unknown organ {name!r}")
        mask[index] = True
    if not 0 <= severity <= 1:
        raise ValueError(f"severity must lie in [0, 1], got {severity}")
    return Spec(  # host arrays: cheap to build and stack per image
        species=species,
        subject=np.int32(subject),
        state=np.int32(state_index(state)),
        severity=np.float32(severity),
        minutes=np.float32(minutes),
        icg_dose_mg_kg=np.float32(icg_dose_mg_kg),
        focus=np.int32(focus_index),
        affected=mask,
    )


def stack_specs(specs: Sequence[Spec]) -> Spec:
    """Stacks specifications along a new leading axis (for `generate_batch`)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *specs)


def _tissue_means(image_normals, species: Species, subject_key):
    """Organ means for one image on the sampling scale, (T, 7) = log B, logit S, W, F, log a, b, M.

    Subject effects (systemic and per organ) come from `subject_key` only, so every image of a
    subject shares them; the image adds its own smaller per-organ jitter (`image_normals`,
    standard normal draws of shape (T, 6)).
    """
    prior = jnp.asarray(TISSUE_PRIOR_MEAN)
    spread = jnp.asarray(TISSUE_PRIOR_SPREAD)
    subject_draws = Draws(subject_key, normals=5 + spread.size)
    systemic = species.subject_sd * subject_draws.normal((4,))
    # Subject and image jitter (fractions of the organ prior spread): 0.65 and 0.25, so that
    # the variance decomposition of physiological organ spectra attributes about as much to
    # subjects and species as the paper's linear mixed model (subject 0.15-0.21, species
    # 0.69-0.74 per wavelength). Was 0.4/0.3 (subject fraction 0.10 on sim_small), then 0.5/0.25
    # (0.11, species 0.76; datasets 1.1.0).
    subject = 0.65 * spread * subject_draws.normal(spread.shape)
    image = 0.25 * spread * image_normals
    offset = subject + image
    saturation = jnp.clip(prior[:, 1] + species.saturation_offset + species.saturation_shift,
                          0.02, 0.98)
    means = jnp.stack([
        jnp.log(prior[:, 0] * species.blood_scale) + systemic[0] + offset[:, 0],
        jax.scipy.special.logit(saturation) + systemic[1] + offset[:, 1],
        prior[:, 2] + species.water_shift + systemic[2] + offset[:, 2],
        prior[:, 3] + species.fat_shift + offset[:, 3],
        jnp.log(prior[:, 4] * species.scatter_scale) + systemic[3] + offset[:, 4],
        prior[:, 5] + species.scatter_power_shift + offset[:, 5],
        species.pigment,
    ], axis=-1)
    hemoglobin = species.hemoglobin_g_l * jnp.exp(0.06 * subject_draws.normal())
    return means, hemoglobin


def _absorption_basis(spectra: BandSpectra, peak_shift_nm) -> jnp.ndarray:
    """(8, C): HbO2, Hb (per g/L), water, fat, pigment, ICG monomer, ICG aggregate, baseline."""
    fine = jnp.asarray(spectra.fine_wavelength_nm, jnp.float32)
    icg = jnp.asarray(spectra.fine_mua_icg_per_molar, jnp.float32)
    response = jnp.asarray(spectra.response, jnp.float32)
    monomer = response @ jnp.interp(fine - peak_shift_nm, fine, icg)
    aggregate = ICG_AGGREGATE_STRENGTH * response @ jnp.interp(
        fine + ICG_AGGREGATE_BLUE_SHIFT_NM - peak_shift_nm, fine, icg, right=0.0)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return jnp.stack([f32(spectra.mua_hbo2_per_g_l), f32(spectra.mua_hb_per_g_l),
                      f32(spectra.mua_water), f32(spectra.mua_fat), f32(spectra.mua_melanin),
                      monomer, aggregate, f32(spectra.mua_baseline)])


def _block_rows(height: int, most: int = 32) -> int:
    """The largest divisor of `height` that is at most `most`: image rows per rendering block."""
    return max(r for r in range(1, min(height, most) + 1) if height % r == 0)


def _render(key, pixels: dict, patterns: dict, basis, background, spectra: BandSpectra,
            camera: camera_lib.Camera):
    """Spectra, illumination and sensor, rendered in blocks of image rows.

    Every (H, W, C) value is a function of a few per-pixel inputs; rendered in one piece, XLA on
    a CPU fuses the per-pixel computations (random fields, shading) into the per-band loop and
    redoes them for each of the ~100 bands. Over row blocks (`lax.map`) the per-pixel inputs are
    computed once, and each block's ~2M values stay in cache.

    Returns:
      ``cube`` (H, W, C) and ``oversaturated`` (H, W).
    """
    height = pixels["material"].shape[0]
    rows = _block_rows(height)
    blocks = height // rows
    log_rel = jnp.log(jnp.asarray(spectra.wavelength_nm, jnp.float32) / 500.0)
    split = lambda x: x.reshape(blocks, rows, *x.shape[1:])
    pattern_blocks = {k: jnp.broadcast_to(v, (blocks, *v.shape)) if k == "line_gain"
                      else split(v) for k, v in patterns.items()}

    def render_block(args):
        block_key, px, pattern = args
        mua = px["weights"] @ basis
        log_musp = px["scattering"][..., :1] - px["scattering"][..., 1:] * log_rel
        tissue = reflectance_from_log_ratio(jnp.log(mua) - log_musp)
        material = px["material"]
        non_tissue = jax.nn.one_hot(material - NUM_TISSUES, background.shape[0]) @ background
        reflectance = jnp.where((material < NUM_TISSUES)[..., None], tissue, non_tissue)
        observed = (px["illumination"][..., None] * (reflectance + px["surface"][..., None])
                    + px["specular"][..., None])
        return camera_lib.expose(block_key, observed, pattern, camera)

    cube, oversaturated = jax.lax.map(
        render_block, (jax.random.split(key, blocks), jax.tree.map(split, pixels),
                       pattern_blocks))
    return cube.reshape(height, *cube.shape[2:]), oversaturated.reshape(height, -1)


@functools.partial(jax.jit, static_argnames=("height", "width", "camera"))
def generate(key, spec: Spec, *, height: int = 480, width: int = 640,
             camera: camera_lib.Camera = camera_lib.Camera()) -> dict:
    """Simulates one image.

    Args:
      key: PRNG key (the image; subject effects come from ``spec.subject``).
      spec: what to simulate.
      height, width: image size (static); the field of view is always the Tivita's.
      camera: static camera settings.

    Returns:
      ``cube`` (H, W, C) float32 calibrated reflectance; ``labels`` (H, W) int32 in SPECIES_12
      with invalid index 12; ``valid`` (H, W) bool; ground-truth maps (H, W) ``saturation``,
      ``blood_volume``, ``water``, ``fat``, ``icg_molar`` (0 outside tissue); ``specular`` and
      ``oversaturated`` (H, W) bool; ``metadata``, a dict of scalars.
    """
    species = spec.species
    spectra = band_spectra(camera.bands)
    k_layout, k_image, k_micro, k_sensor = jax.random.split(key, 4)
    draws = Draws(k_image, uniforms=16, normals=NUM_TISSUES * 6 + (5 * 7 + 24 * 32) * 6)
    subject_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(SUBJECT_SEED), species.species_id), spec.subject)

    scene = layout(k_layout, species, spec.focus, height, width)
    material = scene["material"]
    is_tissue = material < NUM_TISSUES
    tissue = jnp.minimum(material, NUM_TISSUES - 1)
    labels = jnp.asarray(MATERIAL_LABEL)[material]

    # Per-pixel physiology: organ means + smooth fields + micro texture, then vessels.
    means, hemoglobin = _tissue_means(draws.normal((NUM_TISSUES, 6)), species, subject_key)
    spread = jnp.asarray(TISSUE_PRIOR_SPREAD)[tissue]
    field = (0.55 * smooth_field(draws.normal((5, 7, 6)), height, width)
             + 0.35 * smooth_field(draws.normal((24, 32, 6)), height, width)
             + 0.15 * jax.random.normal(k_micro, (height, width, 6)))
    theta = means[tissue, :6] + spread * field
    water = jnp.clip(theta[..., 2], 0.0, 0.95)
    params = {
        "blood": jnp.clip(jnp.exp(theta[..., 0]), 1e-4, 0.7) * (1 + 9.0 * scene["vessel"]),
        "saturation": jax.nn.sigmoid(theta[..., 1]),
        "water": water,
        "scatter_power": jnp.clip(theta[..., 5], 0.2, 3.0),
        "icg_molar": jnp.zeros((height, width)),
    }
    params["saturation"] = params["saturation"] + 0.7 * scene["vessel"] * (
        0.9 - params["saturation"])
    affected = jnp.where(spec.state == PerfusionState.ICG, is_tissue,
                         spec.affected[labels] & is_tissue)
    params, state_metadata = apply_state(
        draws.uniform((2,)), params, species=species, state=spec.state, severity=spec.severity,
        minutes=spec.minutes, dose_mg_kg=spec.icg_dose_mg_kg, affected=affected,
        is_liver=tissue == _LIVER)
    blood, saturation, icg = params["blood"], params["saturation"], params["icg_molar"]
    water = jnp.clip(params["water"], 0.0, 0.95)
    fat = jnp.clip(theta[..., 3], 0.0, 1.0 - water)

    # Per-pixel inputs of the spectral rendering: chromophore weights, scattering, illumination.
    basis = _absorption_basis(spectra, species.icg_peak_shift_nm)
    plasma_icg = blood * (1 - species.hematocrit) * icg
    aggregated = icg / (icg + ICG_AGGREGATION_HALF_MOLAR)
    hb = blood * hemoglobin
    weights = jnp.stack([hb * saturation, hb * (1 - saturation), water, fat, means[tissue, 6],
                         plasma_icg * (1 - aggregated), plasma_icg * aggregated,
                         jnp.ones_like(hb)], axis=-1)
    scattering = jnp.stack([theta[..., 4], params["scatter_power"]], axis=-1)  # log a, b
    background = camera_lib.background_reflectance(draws.uniform((8,)), spectra.wavelength_nm,
                                                   spectra.mua_water)
    pixel_mm = (FIELD_OF_VIEW_MM[0] / height, FIELD_OF_VIEW_MM[1] / width)
    lambert, highlight = camera_lib.shading(scene["height_mm"], pixel_mm, camera,
                                            exponent=draws.uniform((), 40.0, 250.0))
    exposure = draws.uniform((), 0.85, 1.1)
    yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, height), jnp.linspace(-1, 1, width), indexing="ij")
    vignette = 1.0 - 0.125 * (yy**2 + xx**2)
    surface = jnp.where(is_tissue, draws.uniform((), 0.005, 0.03), 0.0)
    gloss_table = jnp.concatenate([
        jnp.full(NUM_TISSUES, draws.uniform((), 0.03, 0.15)),
        jnp.array([0.01, 0.01, 0.03, 0.6, 0.15, 0.0]),  # order of materials.NON_TISSUES
    ])
    specular = gloss_table[material] * highlight
    pixels = {"weights": weights, "scattering": scattering, "material": material,
              "illumination": exposure * vignette * lambert, "surface": surface,
              "specular": specular}
    k_pattern, k_noise = jax.random.split(k_sensor)
    patterns = (camera_lib.sensor_patterns(k_pattern, height, width, camera) if camera.noise
                else {})
    cube, oversaturated = _render(k_noise, pixels, patterns, basis, background, spectra, camera)

    zero = lambda x: jnp.where(is_tissue, x, 0.0).astype(jnp.float32)
    return {
        "cube": cube,
        "labels": labels,
        "valid": SPECIES_12.is_valid(labels),
        "saturation": zero(saturation),
        "blood_volume": zero(blood),
        "water": zero(water),
        "fat": zero(fat),
        "icg_molar": zero(icg),
        "specular": specular > 0.05,
        "oversaturated": oversaturated,
        "metadata": {
            "species_id": species.species_id,
            "subject": spec.subject,
            "state": spec.state,
            "severity": spec.severity,
            "minutes": spec.minutes,
            "icg_dose_mg_kg": spec.icg_dose_mg_kg,
            "hemoglobin_g_l": hemoglobin,
            "exposure": exposure,
            **state_metadata,
        },
    }


@functools.partial(jax.jit, static_argnames=("height", "width", "camera"))
def generate_batch(keys, specs: Spec, *, height: int = 480, width: int = 640,
                   camera: camera_lib.Camera = camera_lib.Camera()) -> dict:
    """`generate` over a batch of keys and stacked specs (see `stack_specs`).

    Images are generated one after the other with `lax.map` (on a CPU a vmap gains nothing and
    compiles slower); the results equal `generate` on each image.
    """
    return jax.lax.map(
        lambda args: generate(*args, height=height, width=width, camera=camera), (keys, specs))
