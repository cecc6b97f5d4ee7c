"""Per-image organ spectra: the one pass over a dataset that every analysis starts from.

For every image and every annotated organ in it, `extract` keeps the mean and the median (per
band) of the organ's L1-normalised pixel spectra, the medians of `parts` disjoint random pixel
subsets (the repeated measures of the variance decomposition), and the organ's Tivita StO2
index (per-image median and a histogram over pixels). Only the dataset API is used (`Catalog`
records and their ``cube``, ``labels`` and ``valid`` features), so any dataset config works,
simulated or real.

A pathological image contributes only the organs its pathology acts on where the dataset says
which (`Catalog.pathological_organs`; the simulated datasets do): the unclamped kidney of an
aortic-clamping image is not a malperfused kidney. Real datasets do not say, so every annotated
organ of their pathological images counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from xeno_jax.labels import SPECIES_12
from xeno_jax.spectra import l1_normalize, sto2

STO2_BINS = np.linspace(0.0, 1.0, 21)  # 0.05-wide bins of the StO2 index
VERSION = 2  # of what `extract` keeps (2: only the organs a pathology acts on); cache keys
_sto2_map = jax.jit(sto2)


@dataclasses.dataclass(frozen=True)
class OrganSpectra:
    """One row per (image, organ); arrays share the first axis.

    Attributes:
      image_name, subject, species, perfusion_state, experiment: (N,) str.
      label: (N,) int, SPECIES_12 index of the organ.
      pixels: (N,) int, organ pixels in the image.
      mean, median: (N, C) mean and per-band median L1 spectrum of the organ's pixels.
      parts: (N, K, C) per-band medians of K disjoint random pixel subsets of equal size (NaN
        where the organ has fewer than K pixels).
      sto2_median: (N,) median StO2 index of the organ's pixels.
      sto2_histogram: (N, len(STO2_BINS) - 1) pixel counts of the StO2 index.
    """

    image_name: np.ndarray
    subject: np.ndarray
    species: np.ndarray
    perfusion_state: np.ndarray
    experiment: np.ndarray
    label: np.ndarray
    pixels: np.ndarray
    mean: np.ndarray
    median: np.ndarray
    parts: np.ndarray
    sto2_median: np.ndarray
    sto2_histogram: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def select(self, mask) -> OrganSpectra:
        """The rows where `mask` is true."""
        return OrganSpectra(**{f.name: getattr(self, f.name)[mask]
                               for f in dataclasses.fields(self)})

    def where(self, **criteria) -> OrganSpectra:
        """Rows whose fields equal the given values (a sequence value means any of them)."""
        mask = np.ones(len(self), bool)
        for field, wanted in criteria.items():
            values = getattr(self, field)
            mask &= (np.isin(values, list(wanted)) if isinstance(wanted, list | tuple | set)
                     else values == wanted)
        return self.select(mask)

    def spectra(self, statistic: str) -> np.ndarray:
        """The (N, C) per-image spectra of a statistic: ``mean`` or ``median``."""
        if statistic not in ("mean", "median"):
            raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
        return getattr(self, statistic)

    def save(self, path) -> None:
        np.savez(path, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def load(cls, path) -> OrganSpectra:
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def concatenate(cls, tables: Sequence[OrganSpectra]) -> OrganSpectra:
        return cls(**{f.name: np.concatenate([getattr(t, f.name) for t in tables])
                      for f in dataclasses.fields(cls)})


def image_rows(example: dict, *, parts: int, rng: np.random.Generator,
               min_pixels: int = 1, organs: Sequence[int] | None = None) -> dict:
    """The per-organ statistics of one decoded example (see `OrganSpectra`), of every
    annotated organ or of those of `organs` the image shows."""
    cube = np.asarray(example["cube"], np.float32)
    labels = np.asarray(example["labels"])
    valid = np.asarray(example["valid"]) & (labels > 0) & (labels < SPECIES_12.invalid_index)
    organs = [int(v) for v in np.unique(labels[valid]) if organs is None or v in organs]
    oxygenation_map = np.asarray(_sto2_map(cube))  # one image shape: one compilation
    rows = {k: [] for k in ("label", "pixels", "mean", "median", "parts", "sto2_median",
                            "sto2_histogram")}
    for organ in organs:
        mask = valid & (labels == organ)
        if mask.sum() < min_pixels:
            continue
        spectra = l1_normalize(cube[mask]).T  # (C, n): medians along contiguous rows
        oxygenation = oxygenation_map[mask]
        n = spectra.shape[1]
        split = np.full((parts, len(spectra)), np.nan, np.float32)
        if n >= parts:  # equal subsets of n // parts pixels (up to parts - 1 left out)
            chosen = rng.permutation(n)[:n - n % parts].reshape(parts, -1)
            split[:] = np.median(spectra[:, chosen], axis=2).T
        rows["label"].append(organ)
        rows["pixels"].append(n)
        rows["mean"].append(spectra.mean(1))
        rows["median"].append(np.median(spectra, axis=1))
        rows["parts"].append(split)
        rows["sto2_median"].append(np.median(oxygenation))
        rows["sto2_histogram"].append(np.histogram(oxygenation, STO2_BINS)[0])
    return rows


def extract(catalog, records, *, parts: int = 4, seed: int = 0) -> OrganSpectra:
    """`OrganSpectra` of the given catalog records (one read of each image).

    Args:
      catalog: a `xeno_jax.data.Catalog`.
      records: its records to read.
      parts: pixel subsets per organ and image (repeated measures within an image).
      seed: seeds the pixel subsets.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    columns = {k: [] for k in ("image_name", "subject", "species", "perfusion_state",
                               "experiment", "label", "pixels", "mean", "median", "parts",
                               "sto2_median", "sto2_histogram")}
    for number, record in enumerate(records):
        rng = np.random.default_rng([seed, number])
        rows = image_rows(catalog.read(record), parts=parts, rng=rng,
                          organs=catalog.pathological_organs(record))
        for key, values in rows.items():
            columns[key] += values
        for key in ("image_name", "subject", "species", "perfusion_state", "experiment"):
            columns[key] += [getattr(record, key)] * len(rows["label"])
    if not columns["label"]:
        raise ValueError(f"none of the {len(records)} images contains an annotated organ")
    return OrganSpectra(
        **{k: np.asarray(columns[k], str) for k in ("image_name", "subject", "species",
                                                    "perfusion_state", "experiment")},
        label=np.asarray(columns["label"], np.int32),
        pixels=np.asarray(columns["pixels"], np.int64),
        mean=np.stack(columns["mean"]).astype(np.float32),
        median=np.stack(columns["median"]).astype(np.float32),
        parts=np.stack(columns["parts"]),
        sto2_median=np.asarray(columns["sto2_median"], np.float32),
        sto2_histogram=np.stack(columns["sto2_histogram"]).astype(np.int64),
    )
