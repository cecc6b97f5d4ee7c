"""Spectra: camera bands, chromophores, tissue optics, Tivita indices, L1 normalisation."""

from xeno_jax.spectra.bands import TIVITA, BandGrid, tivita_wavelengths
from xeno_jax.spectra.chromophores import (
    BandSpectra,
    ChromophoreTable,
    band_spectra,
    chromophore_table,
)
from xeno_jax.spectra.indices import nir_perfusion_index, sto2, thi, twi
from xeno_jax.spectra.normalize import l1_normalize
from xeno_jax.spectra.optics import (
    Tissue,
    absorption,
    diffuse_reflectance,
    reduced_scattering,
    reflectance_from_albedo,
    tissue_reflectance,
)

__all__ = [
    "TIVITA", "BandGrid", "BandSpectra", "ChromophoreTable", "Tissue", "absorption",
    "band_spectra", "chromophore_table", "diffuse_reflectance", "l1_normalize",
    "nir_perfusion_index", "reduced_scattering", "reflectance_from_albedo", "sto2", "thi",
    "tissue_reflectance", "tivita_wavelengths", "twi",
]
