"""Materials of a simulated surgical scene: tissues with physiological priors, and non-tissue.

Tissue priors are those of ``docs/tissue_optics.md`` section 5.2 (physiological pig = the
reference species; mostly expert estimates chosen to keep the organ ordering seen in HSI:
spleen and liver darkest, kidney dark red, bowel pink, pancreas and omentum pale). Each prior
is a mean and a spread; spreads are the quoted ranges read as +-2 sigma on the sampling scale
(log for blood volume and scattering amplitude, logit for saturation).

Two invalid tissues (fat, muscle) stand for the many annotated structures outside the 12
classes; they carry the invalid label. Non-tissue materials (drapes, gauze, metal, gloves, dark
gaps) are background (label 0) with parametric spectra (see `camera.background_reflectance`).
"""

from __future__ import annotations

import numpy as np

from xeno_jax.labels import SPECIES_12

# Tissue materials, in the order of the rows below.
TISSUES = (
    "stomach", "small_bowel", "colon", "liver", "pancreas", "kidney", "spleen", "omentum",
    "lung", "skin", "peritoneum", "fat", "muscle",
)
NON_TISSUES = ("blue_cloth", "abdominal_linen", "white_compress", "metal", "glove", "dark_gap")
MATERIALS = TISSUES + NON_TISSUES
NUM_TISSUES = len(TISSUES)
NUM_MATERIALS = len(MATERIALS)


def material_index(name: str) -> int:
    try:
        return MATERIALS.index(name)
    except ValueError:
        raise ValueError(f"unknown material {name!r}; known: {MATERIALS}") from None


# Training label of each material: organs by name, invalid tissues -> 12, non-tissue -> 0.
MATERIAL_LABEL = np.array(
    [SPECIES_12.name_to_index(n) for n in TISSUES] + [0] * len(NON_TISSUES), np.int32
)

# Physiological priors (pig). Columns: blood volume fraction B, oxygen saturation S, water W,
# fat F, reduced scattering at 500 nm a (cm^-1), scattering power b, pigment M (melanosome-
# equivalent volume fraction; lumen content and melanin).
PARAMETERS = ("blood", "saturation", "water", "fat", "scatter_amplitude", "scatter_power",
              "pigment")
_PRIORS = {
    #              B      S     W     F     a     b    M
    "stomach":    (0.030, 0.70, 0.78, 0.03, 20.0, 1.30, 0.0),
    "small_bowel": (0.035, 0.72, 0.80, 0.02, 18.0, 1.30, 0.0),
    "colon":      (0.030, 0.70, 0.80, 0.03, 18.0, 1.30, 0.0),
    "liver":      (0.100, 0.55, 0.72, 0.03, 12.0, 1.10, 0.0),
    "pancreas":   (0.020, 0.72, 0.74, 0.08, 24.0, 1.40, 0.0),
    # Kidney S 0.82 (was 0.70): the paper's physiological kidneys show a Tivita StO2 index
    # mostly at or above 0.6 (Tivita kidney 70.3 +- 11.0 %, Studier-Fischer et al. 2024, Sci
    # Rep 14, doi:10.1038/s41598-024-68280-3); the simulated index reads about 0.1 below the
    # true S of kidney (noise, surface reflection), so S 0.70 gave an index median of 0.56 in
    # pig, and 0.80 still 0.62.
    "kidney":     (0.060, 0.82, 0.80, 0.01, 16.0, 1.30, 0.0),
    "spleen":     (0.180, 0.58, 0.78, 0.01, 14.0, 1.10, 0.0),
    "omentum":    (0.015, 0.80, 0.15, 0.75, 19.3, 0.80, 0.0),
    "lung":       (0.080, 0.92, 0.80, 0.02, 30.0, 1.20, 0.0),
    "skin":       (0.010, 0.65, 0.65, 0.10, 44.0, 1.40, 0.0),
    "peritoneum": (0.020, 0.70, 0.72, 0.15, 20.0, 1.30, 0.0),
    "fat":        (0.010, 0.80, 0.15, 0.80, 19.3, 0.70, 0.0),
    "muscle":     (0.040, 0.65, 0.75, 0.05, 16.0, 1.50, 0.0),
}
# Spreads (one sigma) on the sampling scale: log B, logit S, W, F, log a, b.
_SPREADS = {
    "stomach":    (0.30, 0.38, 0.03, 0.01, 0.16, 0.08),
    "small_bowel": (0.27, 0.30, 0.03, 0.01, 0.18, 0.08),
    "colon":      (0.30, 0.30, 0.03, 0.01, 0.16, 0.08),
    "liver":      (0.35, 0.30, 0.03, 0.02, 0.20, 0.08),
    "pancreas":   (0.35, 0.30, 0.03, 0.03, 0.13, 0.08),
    "kidney":     (0.30, 0.30, 0.03, 0.005, 0.15, 0.08),
    "spleen":     (0.27, 0.26, 0.03, 0.005, 0.17, 0.08),
    "omentum":    (0.45, 0.34, 0.05, 0.08, 0.10, 0.10),
    "lung":       (0.33, 0.50, 0.03, 0.01, 0.20, 0.08),
    "skin":       (0.58, 0.35, 0.04, 0.03, 0.10, 0.08),
    "peritoneum": (0.35, 0.30, 0.04, 0.05, 0.12, 0.08),
    "fat":        (0.45, 0.34, 0.05, 0.05, 0.10, 0.10),
    "muscle":     (0.30, 0.30, 0.03, 0.02, 0.12, 0.08),
}

TISSUE_PRIOR_MEAN = np.array([_PRIORS[n] for n in TISSUES], np.float32)  # (T, 7)
TISSUE_PRIOR_SPREAD = np.array([_SPREADS[n] for n in TISSUES], np.float32)  # (T, 6)
