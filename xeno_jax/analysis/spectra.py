"""(a) Organ spectra per (species, organ, perfusion state), image -> subject -> group.

Per-image spectra (the mean or the per-band median of an organ's L1-normalised pixels) are
averaged over each subject's images, then over subjects, so that every subject counts once
however many images it has. Bands come from a subject bootstrap: subjects are drawn with
replacement (`subject_weights`: multinomial counts) and the group spectrum is the weighted mean
of the subject spectra, for all resamples in one matrix product.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xeno_jax.analysis.extract import OrganSpectra

CONFIDENCE = 0.95


def subject_means(values: np.ndarray, subjects: np.ndarray, order: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` (N, ...) over each subject's rows: (subject names, (S, ...) means).

    `order` fixes the subjects (and their order); subjects without rows give NaN.
    """
    names = np.unique(subjects) if order is None else np.asarray(order)
    index = {name: i for i, name in enumerate(names)}
    rows = np.array([index[s] for s in subjects], np.int64)
    flat = values.reshape(len(values), -1).astype(np.float64)
    sums = np.zeros((len(names), flat.shape[1]))
    np.add.at(sums, rows, flat)
    counts = np.bincount(rows, minlength=len(names)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    return names, means.reshape(len(names), *values.shape[1:])


def subject_weights(num_subjects: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, S) counts of each subject in bootstrap resamples of the S subjects."""
    return rng.multinomial(num_subjects, np.full(num_subjects, 1.0 / num_subjects),
                           size=resamples).astype(np.float64)


def weighted_group_mean(means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Group means (B, ...) from subject means (S, ...) and weights (B, S); NaN subjects skipped.

    A resample without any weight on a subject with data gives NaN.
    """
    flat = means.reshape(len(means), -1)
    present = np.isfinite(flat[:, 0])
    w = np.where(present[None], weights, 0.0)
    total = w.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (w @ np.where(present[:, None], flat, 0.0)) / total
    return out.reshape(len(weights), *means.shape[1:])


def interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis, ignoring NaN resamples."""
    tail = 50 * (1 - confidence)
    return (np.nanpercentile(samples, tail, axis=0),
            np.nanpercentile(samples, 100 - tail, axis=0))


@dataclasses.dataclass(frozen=True)
class GroupSpectrum:
    """The spectrum of one (species, organ, state) group with its subject-bootstrap band."""

    species: str
    label: int
    perfusion_state: str
    statistic: str
    spectrum: np.ndarray  # (C,)
    low: np.ndarray
    high: np.ndarray
    subjects: int
    images: int


def group_spectra(table: OrganSpectra, *, statistic: str = "median", resamples: int = 1000,
                  seed: int = 0) -> list[GroupSpectrum]:
    """A `GroupSpectrum` for every (species, organ, perfusion state) in the table."""
    out = []
    rng = np.random.default_rng(seed)
    keys = sorted(set(zip(table.species, table.label.tolist(), table.perfusion_state,
                          strict=True)))
    for species, label, state in keys:
        rows = table.where(species=species, label=label, perfusion_state=state)
        _, means = subject_means(rows.spectra(statistic), rows.subject)
        samples = weighted_group_mean(means, subject_weights(len(means), resamples, rng))
        low, high = interval(samples)
        out.append(GroupSpectrum(species, label, state, statistic, means.mean(0), low, high,
                                 subjects=len(means), images=len(np.unique(rows.image_name))))
    return out
