"""Absorption spectra of tissue chromophores, vendored with provenance.

``data/chromophores.csv`` (Prahl haemoglobin, Buiteveld/Kou water, van Veen fat, plasma-bound
ICG; 450-1050 nm on a 1-nm grid) and its provenance ``data/README.md`` are copied unchanged
from the team's verified tables; ``tools/make_chromophores.py`` regenerates them.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources
from pathlib import Path

import numpy as np

from xeno_jax.spectra.bands import BandGrid

HB_MOLAR_MASS_G_PER_MOL = 64_500.0
"""Haemoglobin tetramer, the unit of Prahl's molar extinction."""
ICG_MOLAR_MASS_G_PER_MOL = 774.96
LN10 = float(np.log(10.0))

COLUMNS = ("wavelength_nm", "eps_hbo2", "eps_hb", "mua_water", "mua_fat", "eps_icg")


def read_table(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a ``#``-commented CSV with one header row into column arrays."""
    path = Path(path)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no header row")
    names = lines[0].strip().split(",")
    try:
        values = np.loadtxt(lines[1:], delimiter=",", ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: unreadable numbers ({e})") from None
    if values.shape[1] != len(names):
        raise ValueError(f"{path}: {len(names)} columns in the header, {values.shape[1]} in rows")
    return dict(zip(names, values.T, strict=True))


@dataclasses.dataclass(frozen=True)
class ChromophoreTable:
    """Chromophore spectra on a common wavelength grid (units as in the vendored CSV)."""

    wavelength_nm: np.ndarray
    eps_hbo2: np.ndarray  # cm^-1 / M, decadic, per mole of tetramer
    eps_hb: np.ndarray
    mua_water: np.ndarray  # cm^-1
    mua_fat: np.ndarray  # cm^-1
    eps_icg: np.ndarray  # cm^-1 / M, decadic

    @classmethod
    def from_csv(cls, path: str | Path) -> ChromophoreTable:
        table = read_table(path)
        missing = [c for c in COLUMNS if c not in table]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        wl = table["wavelength_nm"]
        if np.any(np.diff(wl) <= 0):
            raise ValueError(f"{path}: wavelength_nm must increase strictly")
        for name in COLUMNS[1:]:
            if not np.all(np.isfinite(table[name])) or np.any(table[name] < 0):
                raise ValueError(f"{path}: column {name} must be finite and non-negative")
        return cls(**{c: table[c] for c in COLUMNS})

    def on_bands(self, grid: BandGrid) -> BandSpectra:
        """Band-averaged absorption spectra for a camera band grid."""
        response = grid.response(self.wavelength_nm)
        to_bands = lambda column: response @ column
        return BandSpectra(
            wavelength_nm=grid.centers,
            mua_hbo2_per_g_l=to_bands(self.eps_hbo2) * LN10 / HB_MOLAR_MASS_G_PER_MOL,
            mua_hb_per_g_l=to_bands(self.eps_hb) * LN10 / HB_MOLAR_MASS_G_PER_MOL,
            mua_water=to_bands(self.mua_water),
            mua_fat=to_bands(self.mua_fat),
            mua_melanin=to_bands(melanin_absorption(self.wavelength_nm)),
            mua_baseline=to_bands(baseline_absorption(self.wavelength_nm)),
            mua_icg_per_molar=to_bands(self.eps_icg) * LN10,
            response=response,
            fine_wavelength_nm=self.wavelength_nm,
            fine_mua_icg_per_molar=self.eps_icg * LN10,
        )


@dataclasses.dataclass(frozen=True)
class BandSpectra:
    """Absorption per unit of each chromophore, per camera band (NumPy, float64).

    ``mua_hb*_per_g_l`` multiply a haemoglobin concentration in g/L, ``mua_icg_per_molar`` a molar
    ICG concentration; water, fat and melanin are absorption coefficients of the pure substance
    (multiply a volume fraction). The fine-grid ICG column and `response` let a caller shift the
    ICG spectrum before band averaging.
    """

    wavelength_nm: np.ndarray
    mua_hbo2_per_g_l: np.ndarray
    mua_hb_per_g_l: np.ndarray
    mua_water: np.ndarray
    mua_fat: np.ndarray
    mua_melanin: np.ndarray
    mua_baseline: np.ndarray
    mua_icg_per_molar: np.ndarray
    response: np.ndarray
    fine_wavelength_nm: np.ndarray
    fine_mua_icg_per_molar: np.ndarray


def melanin_absorption(wavelength_nm: np.ndarray) -> np.ndarray:
    """Absorption of melanosomes, 6.6e11 * lambda^-3.33 cm^-1 (Jacques 1998; as in SIMPA)."""
    return 6.6e11 * np.asarray(wavelength_nm, dtype=np.float64) ** -3.33


def baseline_absorption(wavelength_nm: np.ndarray) -> np.ndarray:
    """Bloodless 'dry tissue' absorption, 0.02 * (lambda / 500 nm)^-3 cm^-1 (an estimate)."""
    return 0.02 * (np.asarray(wavelength_nm, dtype=np.float64) / 500.0) ** -3


def table_path() -> Path:
    return Path(str(resources.files("xeno_jax.spectra") / "data" / "chromophores.csv"))


@functools.cache
def chromophore_table() -> ChromophoreTable:
    """The vendored table (cached)."""
    return ChromophoreTable.from_csv(table_path())


@functools.cache
def band_spectra(grid: BandGrid = BandGrid()) -> BandSpectra:
    """The vendored table averaged onto `grid` (cached per grid)."""
    return chromophore_table().on_bands(grid)
