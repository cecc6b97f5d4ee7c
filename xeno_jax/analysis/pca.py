"""(d) PCA of per-image organ spectra, and the StO2 index per perfusion state.

`principal_components` projects the per-image spectra of one organ (every species and state)
onto their first principal components; `trajectories` gives, per species, the subject
centroids and the arrow from the physiological to each pathological centroid (subject-level
means, like every group statistic here). `sto2_distribution` pools the pixel histograms of the
StO2 index per (species, organ, state) and reports the shares of pixels in the ranges the
paper's malperfusion figure discusses.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xeno_jax.analysis.extract import STO2_BINS, OrganSpectra
from xeno_jax.analysis.spectra import subject_means

PHYSIOLOGICAL = "physiological"
LOW_STO2 = (0.1, 0.3)  # the paper's malperfused kidneys lie mostly here
HIGH_STO2 = 0.6  # ... and physiological ones mostly at or above this


@dataclasses.dataclass(frozen=True)
class Projection:
    """Per-image scores on the first principal components of one organ's spectra."""

    label: int
    scores: np.ndarray  # (N, k)
    explained: np.ndarray  # (k,) fraction of variance per component
    rows: OrganSpectra  # the images, in the order of `scores`


def principal_components(table: OrganSpectra, label: int, *, statistic: str = "median",
                         components: int = 2) -> Projection:
    """PCA (SVD of the centred per-image spectra) of one organ over all species and states."""
    rows = table.where(label=label)
    if len(rows) <= components:
        raise ValueError(f"label {label}: {len(rows)} images, need more than {components}")
    x = rows.spectra(statistic).astype(np.float64)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    explained = s**2 / np.sum(s**2)
    return Projection(label, u[:, :components] * s[:components], explained[:components], rows)


def trajectories(projection: Projection) -> list[dict]:
    """Per (species, state): subject centroids and the group centroid in PC space.

    Each entry has ``species``, ``state``, ``subjects`` (S, k) and ``centroid`` (k,); the
    arrow of a pathological state starts at the species' physiological centroid.
    """
    rows, out = projection.rows, []
    for species in np.unique(rows.species):
        for state in np.unique(rows.perfusion_state[rows.species == species]):
            mask = (rows.species == species) & (rows.perfusion_state == state)
            _, centres = subject_means(projection.scores[mask], rows.subject[mask])
            out.append({"species": str(species), "state": str(state), "subjects": centres,
                        "centroid": centres.mean(0)})
    return out


def sto2_distribution(table: OrganSpectra) -> list[dict]:
    """Per (species, organ, state): pooled pixel histogram and shares of the StO2 index.

    Shares are over subjects (each subject's pixel histogram normalised, then averaged), so a
    subject with many images counts once, as in the other analyses.
    """
    centres = (STO2_BINS[:-1] + STO2_BINS[1:]) / 2
    low = (centres >= LOW_STO2[0]) & (centres < LOW_STO2[1])
    high = centres >= HIGH_STO2
    out = []
    keys = sorted(set(zip(table.species, table.label.tolist(), table.perfusion_state,
                          strict=True)))
    for species, label, state in keys:
        rows = table.where(species=species, label=label, perfusion_state=state)
        _, counts = subject_means(rows.sto2_histogram.astype(np.float64), rows.subject)
        shares = counts / counts.sum(1, keepdims=True)
        histogram = shares.mean(0)
        _, medians = subject_means(rows.sto2_median, rows.subject)
        out.append({"species": species, "label": label, "perfusion_state": state,
                    "subjects": len(shares), "histogram": histogram,
                    "share_low": float(histogram[low].sum()),
                    "share_high": float(histogram[high].sum()),
                    "median": float(np.median(medians))})
    return out
