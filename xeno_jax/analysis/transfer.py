"""(b) Transfer similarity: how alike the pathological changes of two species are.

The change of a species' organ under a pathology is its group spectrum in the pathological
state minus that in the physiological state (image -> subject -> group, `spectra`). Between two
species the analysis reports the cosine of the changes and their magnitude ratio, next to the
scales they have to be read against: the distance between the species' physiological spectra
and the spread of subjects within each species. Intervals come from subject bootstraps: a
species' subjects are resampled once per resample and the same weights apply to its
physiological and pathological images (paired designs stay paired); species are independent.
All distances are Euclidean (L2) norms of L1-normalised spectra.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from xeno_jax.analysis.extract import OrganSpectra
from xeno_jax.analysis.spectra import interval, subject_means, subject_weights, weighted_group_mean

PHYSIOLOGICAL = "physiological"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis."""
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def magnitude_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|b| / |a|`` along the last axis."""
    return np.linalg.norm(b, axis=-1) / np.linalg.norm(a, axis=-1)


@dataclasses.dataclass(frozen=True)
class Change:
    """A species' pathological change of one organ, with its subject-bootstrap resamples."""

    species: str
    label: int
    pathology: str
    change: np.ndarray  # (C,)
    change_samples: np.ndarray  # (B, C)
    physiological: np.ndarray  # (C,)
    physiological_samples: np.ndarray  # (B, C)
    subject_spread: float  # RMS distance of physiological subject spectra to their group's
    subjects: tuple[int, int]  # (physiological, pathological)


def species_change(table: OrganSpectra, species: str, label: int, pathology: str, *,
                   statistic: str = "median", resamples: int = 1000,
                   rng: np.random.Generator) -> Change | None:
    """The change of `label` in `species` under `pathology` (None if a state has no images)."""
    rows = table.where(species=species, label=label)
    healthy = rows.where(perfusion_state=PHYSIOLOGICAL)
    sick = rows.where(perfusion_state=pathology)
    if not len(healthy) or not len(sick):
        return None
    subjects = np.unique(np.concatenate([healthy.subject, sick.subject]))
    weights = subject_weights(len(subjects), resamples, rng)
    groups = []
    for part in (healthy, sick):
        _, means = subject_means(part.spectra(statistic), part.subject, order=subjects)
        groups.append((np.nanmean(means, axis=0), weighted_group_mean(means, weights), means))
    (h, h_samples, h_means), (s, s_samples, s_means) = groups
    h_means = h_means[np.isfinite(h_means[:, 0])]
    spread = float(np.sqrt(np.mean(np.sum((h_means - h) ** 2, axis=1))))
    return Change(species, int(label), pathology, s - h, s_samples - h_samples, h, h_samples,
                  spread, (len(h_means), int(np.isfinite(s_means[:, 0]).sum())))


def changes(table: OrganSpectra, species: Sequence[str], *, statistic: str = "median",
            resamples: int = 1000, seed: int = 0) -> list[Change]:
    """Every (species, organ, pathology) change the table supports."""
    out = []
    pathologies = sorted(set(table.perfusion_state) - {PHYSIOLOGICAL})
    for number, sp in enumerate(species):
        rng = np.random.default_rng([seed, number])
        for pathology in pathologies:
            for label in sorted(set(table.where(species=sp, perfusion_state=pathology).label)):
                change = species_change(table, sp, int(label), pathology, statistic=statistic,
                                        resamples=resamples, rng=rng)
                if change is not None:
                    out.append(change)
    return out


def _with_interval(value: float, samples: np.ndarray) -> tuple[float, float, float]:
    low, high = interval(samples)
    return float(value), float(low), float(high)


def pair_rows(found: Sequence[Change], species: Sequence[str]) -> list[dict]:
    """For every (organ, pathology) and species pair: the similarity of their changes.

    Each row holds the cosine, the magnitude ratio (second species over first), the distance
    of the physiological spectra, both change magnitudes and both subject spreads; the first
    three as (value, low, high).
    """
    by_key = {(c.label, c.pathology, c.species): c for c in found}
    rows = []
    for label, pathology in sorted({(c.label, c.pathology) for c in found}):
        for a, b in itertools.combinations(species, 2):
            ca, cb = by_key.get((label, pathology, a)), by_key.get((label, pathology, b))
            if ca is None or cb is None:
                continue
            rows.append({
                "label": label, "pathology": pathology, "species_a": a, "species_b": b,
                "cosine": _with_interval(cosine(ca.change, cb.change),
                                         cosine(ca.change_samples, cb.change_samples)),
                "magnitude_ratio": _with_interval(
                    magnitude_ratio(ca.change, cb.change),
                    magnitude_ratio(ca.change_samples, cb.change_samples)),
                "physiological_distance": _with_interval(
                    np.linalg.norm(ca.physiological - cb.physiological),
                    np.linalg.norm(ca.physiological_samples - cb.physiological_samples,
                                   axis=-1)),
                "change_a": float(np.linalg.norm(ca.change)),
                "change_b": float(np.linalg.norm(cb.change)),
                "subject_spread_a": ca.subject_spread,
                "subject_spread_b": cb.subject_spread,
            })
    return rows
