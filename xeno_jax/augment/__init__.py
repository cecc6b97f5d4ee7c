"""Augmentations: spectral projection, geometric transforms, organ transplantation, pipelines."""

from xeno_jax.augment.geometric import (
    affine_warp,
    random_affine,
    random_horizontal_flip,
    random_vertical_flip,
)
from xeno_jax.augment.pipeline import (
    BASELINE,
    STEP_NAMES,
    build_pipeline,
    preset,
    revert_invalid_images,
    xeno_steps,
)
from xeno_jax.augment.spectral import LABEL_MODES, l1_renormalize, project_spectra
from xeno_jax.augment.transplant import transplant_organs

__all__ = [
    "BASELINE", "LABEL_MODES", "STEP_NAMES", "affine_warp", "build_pipeline", "l1_renormalize",
    "preset", "project_spectra", "random_affine", "random_horizontal_flip",
    "random_vertical_flip", "revert_invalid_images", "transplant_organs", "xeno_steps",
]
