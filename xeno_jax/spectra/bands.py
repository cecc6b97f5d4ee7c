"""The spectral band grid of the camera and its band response.

The Tivita records 100 bands between 500 and 1000 nm. htc uses ``linspace(500, 1000, 100)``
(a 5.05 nm step), which is the default here; the paper's notebooks use band centres
502.5 ... 997.5 nm. Both are a `BandGrid` away.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BandGrid:
    """Band centres and an optional Gaussian band response.

    Attributes:
      start_nm, stop_nm, num_bands: centres ``linspace(start_nm, stop_nm, num_bands)``.
      fwhm_nm: full width at half maximum of a Gaussian band response; ``None`` samples each
        spectrum at the band centre (linear interpolation).
    """

    start_nm: float = 500.0
    stop_nm: float = 1000.0
    num_bands: int = 100
    fwhm_nm: float | None = None

    def __post_init__(self):
        if self.num_bands < 2 or not self.stop_nm > self.start_nm:
            raise ValueError(f"invalid band grid {self}")
        if self.fwhm_nm is not None and self.fwhm_nm <= 0:
            raise ValueError(f"fwhm_nm must be positive, got {self.fwhm_nm}")

    @property
    def centers(self) -> np.ndarray:
        return np.linspace(self.start_nm, self.stop_nm, self.num_bands)

    def response(self, wavelengths_nm: np.ndarray) -> np.ndarray:
        """Weights ``(num_bands, len(wavelengths_nm))`` that average a tabulated spectrum per band.

        Each row sums to one, so ``response @ spectrum`` is the band value of `spectrum`.
        """
        wl = np.asarray(wavelengths_nm, dtype=np.float64)
        centers = self.centers
        if centers[0] < wl[0] or centers[-1] > wl[-1]:
            raise ValueError(
                f"bands {centers[0]:.1f}-{centers[-1]:.1f} nm exceed the table "
                f"{wl[0]:.1f}-{wl[-1]:.1f} nm"
            )
        if self.fwhm_nm is None:
            weights = np.zeros((len(centers), len(wl)))
            hi = np.clip(np.searchsorted(wl, centers, side="right"), 1, len(wl) - 1)
            lo = hi - 1
            frac = (centers - wl[lo]) / (wl[hi] - wl[lo])
            rows = np.arange(len(centers))
            weights[rows, lo] = 1 - frac
            weights[rows, hi] += frac
            return weights
        sigma = self.fwhm_nm / (2 * np.sqrt(2 * np.log(2)))
        weights = np.exp(-0.5 * ((wl[None, :] - centers[:, None]) / sigma) ** 2)
        return weights / weights.sum(axis=1, keepdims=True)


TIVITA = BandGrid()


def tivita_wavelengths() -> np.ndarray:
    """The default band centres, ``linspace(500, 1000, 100)`` nm."""
    return TIVITA.centers
