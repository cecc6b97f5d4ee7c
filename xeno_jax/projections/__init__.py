"""Projection learning (`fit_projections`) and the bank that stores the maps (`ProjectionBank`)."""

from xeno_jax.projections.bank import ProjectionBank
from xeno_jax.projections.learn import (
    SpectraStatistics,
    fit_projections,
    moment_matching_loss,
    spectra_statistics,
)

__all__ = [
    "ProjectionBank", "SpectraStatistics", "fit_projections", "moment_matching_loss",
    "spectra_statistics",
]
