"""The hierarchical label-balanced sampler of the reference (method.md A6).

Every sample draws a label uniformly from the valid labels present in the training images
(background included), then a subject uniformly among the subjects with an image showing that
label, then one of that subject's images showing it. The joint multi-species model samples per
label one subject and image in every domain (species) that has the label, pools the candidates
and keeps a batch's worth at random. Batches are a pure function of ``(seed, batch index)``, so
an iterator over them is resumable by its position alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from xeno_jax.data.catalog import Record


@dataclasses.dataclass(frozen=True)
class _Tree:
    """Label -> subject -> image lookup of one domain in flat (CSR) arrays."""

    labels: np.ndarray  # (L,) label values
    subject_start: np.ndarray  # (L + 1,) into pair rows
    image_start: np.ndarray  # (P + 1,) into images, one pair per (label, subject)
    images: np.ndarray  # positions into the sampler's records

    @classmethod
    def build(cls, records: Sequence[Record], positions: Sequence[int]) -> _Tree:
        by_label: dict[int, dict[str, list[int]]] = {}
        for position in positions:
            record = records[position]
            for label in record.labels:
                by_label.setdefault(label, {}).setdefault(record.subject, []).append(position)
        labels = np.array(sorted(by_label), np.int64)
        subject_start, image_start, images = [0], [0], []
        for label in labels:
            subjects = by_label[int(label)]
            for subject in sorted(subjects):
                images += sorted(subjects[subject])
                image_start.append(len(images))
            subject_start.append(len(image_start) - 1)
        return cls(labels, np.array(subject_start), np.array(image_start), np.array(images))

    def draw(self, rng: np.random.Generator, label_rows: np.ndarray) -> np.ndarray:
        """One image per entry of `label_rows` (rows into `labels`): subject, then image."""
        first, count = self.subject_start[label_rows], np.diff(self.subject_start)[label_rows]
        pair = first + rng.integers(0, count)
        first, count = self.image_start[pair], np.diff(self.image_start)[pair]
        return self.images[first + rng.integers(0, count)]


class LabelBalancedSampler:
    """Batches of record positions, balanced over labels, then subjects, then images.

    Args:
      records: the training images.
      batch_size: global batch size.
      seed: seed of the draws.
      domain: a `Record` field that splits the records into domains (``"species"`` for the
        joint model), or None for a single domain.
    """

    def __init__(self, records: Sequence[Record], batch_size: int, *, seed: int = 0,
                 domain: str | None = None):
        if not records:
            raise ValueError("the sampler needs at least one training image")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.records = list(records)
        self.batch_size = batch_size
        self.seed = seed
        groups: dict[str, list[int]] = {}
        for position, record in enumerate(self.records):
            key = getattr(record, domain) if domain else ""
            groups.setdefault(key, []).append(position)
        self.domains = [_Tree.build(self.records, groups[k]) for k in sorted(groups)]
        self.labels = np.unique(np.concatenate([d.labels for d in self.domains]))
        if not self.labels.size:
            raise ValueError("no training image has a valid label")

    def batch(self, index: int) -> np.ndarray:
        """Record positions of batch `index` (a pure function of the seed and the index)."""
        rng = np.random.default_rng([self.seed, index])
        if len(self.domains) == 1:
            tree = self.domains[0]
            picks = tree.draw(rng, rng.integers(0, len(tree.labels), self.batch_size))
        else:
            picks = self._joint_batch(rng)
        return rng.permutation(picks)

    def _joint_batch(self, rng: np.random.Generator) -> np.ndarray:
        """Per drawn label, one image from every domain with that label; keep a batch of them."""
        candidates: list[np.ndarray] = []
        total = 0
        while total < self.batch_size:
            draws = math.ceil((self.batch_size - total) / len(self.domains))
            labels = self.labels[rng.integers(0, len(self.labels), draws)]
            for tree in self.domains:
                rows = np.searchsorted(tree.labels, labels)
                has = (rows < len(tree.labels)) & (tree.labels[np.minimum(
                    rows, len(tree.labels) - 1)] == labels)
                if has.any():
                    candidates.append(tree.draw(rng, rows[has]))
                    total += int(has.sum())
        pool = np.concatenate(candidates)
        return rng.choice(pool, self.batch_size, replace=False)
