"""The paper's spectral analyses, on any dataset config (simulated or real).

One pass over the images (`extract`) gives per-image organ spectra; the analyses are pure
functions of that table:

- `spectra`: mean and median L1 spectra per (species, organ, perfusion state), image ->
  subject -> group, with subject-bootstrap bands;
- `transfer`: pathological changes per (species, organ, pathology) and their similarity
  between species (cosine, magnitude ratio) next to the species distance and subject spread;
- `variance`: the linear-mixed-model decomposition of physiological organ spectra into
  species, subject, image and residual variance;
- `pca`: principal components of per-image spectra with subject centroids and
  physiological -> pathological arrows, and StO2 index distributions per state.

`report.write_analyses` writes their tables and figures (``python -m experiments.analyze``).
"""

from xeno_jax.analysis import pca, spectra, transfer, variance
from xeno_jax.analysis.extract import VERSION as EXTRACT_VERSION
from xeno_jax.analysis.extract import OrganSpectra, extract
from xeno_jax.analysis.report import ANALYSES, write_analyses

__all__ = ["ANALYSES", "EXTRACT_VERSION", "OrganSpectra", "extract", "pca", "spectra",
           "transfer", "variance", "write_analyses"]
