"""Augmentations: spectral projection, geometric transforms, organ transplantation, pipelines."""

from xeno_jax.augment.geometric import (
    affine_warp,
    random_affine,
    random_horizontal_flip,
    random_vertical_flip,
)
from xeno_jax.augment.pipeline import (
    STEP_NAMES,
    build_pipeline,
    revert_invalid_images,
    step_arguments,
    steps_from_config,
)
from xeno_jax.augment.spectral import LABEL_MODES, l1_renormalize, project_spectra
from xeno_jax.augment.transplant import transplant_organs

__all__ = [
    "LABEL_MODES", "STEP_NAMES", "affine_warp", "build_pipeline", "l1_renormalize",
    "project_spectra", "random_affine", "random_horizontal_flip", "random_vertical_flip",
    "revert_invalid_images", "step_arguments", "steps_from_config", "transplant_organs",
]
