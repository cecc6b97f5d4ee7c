"""Score tables and the reference's aggregation: class level, image level, subject bootstrap.

Per-image results (`metrics.evaluate_images`) are exploded into a `ScoreTable`, one row per
(image, used label). The aggregations follow ``method.md`` C2 (htc ``MetricAggregation``):

- class level (the default): mean per (subject, label), then per label over subjects;
- image level: mean per image over its labels, then per subject;
- bootstrap: per label, resample its subjects with replacement; the confidence interval of the
  class mean comes from the mean over classes of each bootstrap sample.

NaN scores are skipped by every mean, as pandas does in the reference.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from xeno_jax.io import atomic_write
from xeno_jax.labels import LabelMapping

_ID_COLUMNS = ("image_name", "subject", "label")


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreTable:
    """Columns of scores, one row per (image, label).

    Attributes:
      image_name: ``(R,)`` str.
      subject: ``(R,)`` str, the subject each image belongs to.
      label: ``(R,)`` int label index.
      scores: score name (``dice``, ``nsd``, ``median_sto2``, ...) -> ``(R,)`` float64 column.
    """

    image_name: np.ndarray
    subject: np.ndarray
    label: np.ndarray
    scores: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        ids = {
            "image_name": np.asarray(self.image_name, dtype=str),
            "subject": np.asarray(self.subject, dtype=str),
            "label": np.asarray(self.label),
        }
        if ids["label"].size and not np.issubdtype(ids["label"].dtype, np.integer):
            raise ValueError(f"label must hold integer indices, got dtype {ids['label'].dtype}")
        ids["label"] = ids["label"].astype(np.int64)
        scores = {name: np.asarray(v, dtype=np.float64) for name, v in self.scores.items()}
        clashes = sorted(set(scores) & set(_ID_COLUMNS))
        if clashes:
            raise ValueError(f"score columns may not be named {clashes}")
        lengths = {name: np.shape(column) for name, column in (ids | scores).items()}
        if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) > 1:
            raise ValueError(f"columns must be 1-D and of equal length, got shapes {lengths}")
        for name, column in ids.items():
            object.__setattr__(self, name, column)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return self.label.size

    def column(self, name: str) -> np.ndarray:
        """The score column `name`."""
        if name not in self.scores:
            raise ValueError(f"no score column {name!r}; the table has {sorted(self.scores)}")
        return self.scores[name]

    @classmethod
    def from_images(
        cls, image_names: Sequence[str], subjects: Sequence[str], used, **scores
    ) -> ScoreTable:
        """Explodes per-image results into rows of (image, used label).

        Args:
          image_names: ``(N,)`` one name per image.
          subjects: ``(N,)`` the subject of each image.
          used: bool ``(N, K)``, the used labels of each image.
          **scores: name -> ``(N, K)`` per-class scores (e.g. from `evaluate_images`).

        Returns:
          The table, image-major with labels ascending.
        """
        used = np.asarray(used)
        if used.ndim != 2 or used.dtype != bool:
            raise ValueError(f"used must be a bool (N, K) array, got {used.dtype} {used.shape}")
        per_image = {"image_names": np.shape(image_names), "subjects": np.shape(subjects)}
        if any(shape != used.shape[:1] for shape in per_image.values()):
            raise ValueError(f"expected one entry per image ({used.shape[0]}), got {per_image}")
        bad = {name: np.shape(v) for name, v in scores.items() if np.shape(v) != used.shape}
        if bad:
            raise ValueError(f"scores must have the shape of used {used.shape}, got {bad}")
        image, label = np.nonzero(used)
        return cls(
            image_name=np.asarray(image_names, dtype=str)[image],
            subject=np.asarray(subjects, dtype=str)[image],
            label=label,
            scores={name: np.asarray(v)[image, label] for name, v in scores.items()},
        )

    @classmethod
    def concatenate(cls, tables: Sequence[ScoreTable]) -> ScoreTable:
        """Stacks the rows of tables that have the same score columns."""
        if not tables:
            raise ValueError("concatenate needs at least one table")
        names = [sorted(table.scores) for table in tables]
        if any(n != names[0] for n in names):
            raise ValueError(f"tables must have the same score columns, got {names}")
        return cls(
            **{name: np.concatenate([getattr(t, name) for t in tables]) for name in _ID_COLUMNS},
            scores={n: np.concatenate([t.scores[n] for t in tables]) for n in names[0]},
        )

    def select(self, rows) -> ScoreTable:
        """The rows picked by a boolean mask or an index array."""
        return ScoreTable(
            **{name: getattr(self, name)[rows] for name in _ID_COLUMNS},
            scores={name: column[rows] for name, column in self.scores.items()},
        )

    def with_scores(self, **columns) -> ScoreTable:
        """This table with score columns added or replaced (e.g. ``median_sto2``)."""
        return dataclasses.replace(self, scores={**self.scores, **columns})

    def save(self, path: str | os.PathLike) -> None:
        """Writes the table as an ``.npz`` file (no pickled objects), atomically."""
        with atomic_write(path) as f:
            np.savez(f, **{name: getattr(self, name) for name in _ID_COLUMNS},
                     **{f"score.{name}": column for name, column in self.scores.items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScoreTable:
        """Reads a table written by `save`."""
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in _ID_COLUMNS if n not in data.files]
            if missing:
                raise ValueError(f"{path}: not a score table (missing {missing})")
            return cls(**{n: data[n] for n in _ID_COLUMNS},
                       scores={k[len("score."):]: data[k] for k in data.files
                               if k.startswith("score.")})

    def to_dict(self, label_mapping: LabelMapping | None = None) -> dict[str, np.ndarray]:
        """All columns by name (``pandas.DataFrame(table.to_dict())`` works).

        Args:
          label_mapping: if given, adds a ``label_name`` column.
        """
        columns = {name: getattr(self, name) for name in _ID_COLUMNS}
        if label_mapping is not None:
            columns["label_name"] = np.array(
                [label_mapping.index_to_name(i) for i in self.label], dtype=str
            )
        return columns | dict(self.scores)


# --------------------------------------------------------------------------------------------
# Aggregation.


def _group_means(values: np.ndarray, rows: np.ndarray, columns: np.ndarray):
    """Means of `values` per (row key, column key), skipping NaN.

    Returns:
      ``(row_keys, column_keys, means)`` with `means` ``(len(row_keys), len(column_keys))``,
      NaN for a combination without values.
    """
    keep = ~np.isnan(values)
    row_keys, row_index = np.unique(rows[keep], return_inverse=True)
    column_keys, column_index = np.unique(columns[keep], return_inverse=True)
    cell = row_index * column_keys.size + column_index
    size = row_keys.size * column_keys.size
    sums = np.bincount(cell, weights=values[keep], minlength=size)
    counts = np.bincount(cell, minlength=size)
    means = np.divide(sums, counts, out=np.full(size, np.nan), where=counts > 0)
    return row_keys, column_keys, means.reshape(row_keys.size, column_keys.size)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """`np.nanmean` that gives NaN for all-NaN slices without warning."""
    finite = ~np.isnan(values)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    count = finite.sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassScores:
    """Class-level scores.

    Attributes:
      labels: ``(L,)`` label indices, ascending.
      subjects: ``(S,)`` subject names, sorted.
      subject_scores: ``(L, S)`` mean per (label, subject); NaN where the subject lacks the label.
    """

    labels: np.ndarray
    subjects: np.ndarray
    subject_scores: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """``(L,)`` mean per label over its subjects."""
        return _nanmean(self.subject_scores, axis=1)


def class_level(table: ScoreTable, metric: str = "dice") -> ClassScores:
    """Mean per (subject, label), then per label over subjects (the reference's default).

    Args:
      table: rows of (image, label).
      metric: the score column to aggregate.
    """
    labels, subjects, means = _group_means(table.column(metric), table.label, table.subject)
    return ClassScores(labels=labels, subjects=subjects, subject_scores=means)


@dataclasses.dataclass(frozen=True, eq=False)
class SubjectScores:
    """Image-level scores per subject.

    Attributes:
      subjects: ``(S,)`` subject names, sorted.
      scores: ``(S,)`` mean per subject over its images.
    """

    subjects: np.ndarray
    scores: np.ndarray

    @property
    def mean(self) -> float:
        """Mean over subjects."""
        return float(np.mean(self.scores))


def image_level(table: ScoreTable, metric: str = "dice") -> SubjectScores:
    """Mean per image over its labels, then per subject over its images.

    Args:
      table: rows of (image, label); every image must belong to a single subject.
      metric: the score column to aggregate.
    """
    values = table.column(metric)
    keep = ~np.isnan(values)
    _, first_row, image_index = np.unique(
        table.image_name[keep], return_index=True, return_inverse=True
    )
    image_subject = table.subject[keep][first_row]
    mixed = np.unique(table.image_name[keep][image_subject[image_index] != table.subject[keep]])
    if mixed.size:
        raise ValueError(f"images {mixed.tolist()} appear under more than one subject")
    image_scores = np.bincount(image_index, weights=values[keep]) / np.bincount(image_index)
    subjects, subject_index = np.unique(image_subject, return_inverse=True)
    means = np.bincount(subject_index, weights=image_scores) / np.bincount(subject_index)
    return SubjectScores(subjects=subjects, scores=means)


# --------------------------------------------------------------------------------------------
# Bootstrap.


def resample_mean(values, n_bootstraps: int, rng: np.random.Generator) -> np.ndarray:
    """Means over resamples (with replacement) of the rows of `values`, NaN-aware.

    Args:
      values: ``(S, ...)`` one row per subject.
      n_bootstraps: number of resamples.
      rng: the random generator (advanced by the draw).

    Returns:
      ``(n_bootstraps, ...)``: the NaN-skipping mean over the S resampled rows of each resample.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError(f"need at least one row to resample, got shape {values.shape}")
    indices = rng.integers(0, values.shape[0], size=(n_bootstraps, values.shape[0]))
    return _nanmean(values[indices], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class BootstrapScores:
    """Class-level scores with subject-bootstrap confidence intervals.

    Attributes:
      labels: ``(L,)`` label indices, ascending.
      mean: ``(L,)`` class-level score per label (`class_level`).
      ci_low, ci_high: ``(L,)`` interval bounds per label.
      class_mean: mean of `mean` over labels.
      class_mean_ci_low, class_mean_ci_high: its interval, from the mean over labels of each
        bootstrap sample.
      bootstrap_means: ``(n_bootstraps, L)`` the bootstrap samples.
    """

    labels: np.ndarray
    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    class_mean: float
    class_mean_ci_low: float
    class_mean_ci_high: float
    bootstrap_means: np.ndarray


def bootstrap_class_level(
    table: ScoreTable,
    metric: str = "dice",
    *,
    n_bootstraps: int = 1000,
    seed: int = 42,
    confidence: float = 0.95,
) -> BootstrapScores:
    """Class-level scores with confidence intervals from resampling subjects.

    For every label in turn (ascending), its subjects' scores are resampled with replacement
    `n_bootstraps` times from ``np.random.default_rng(seed)``; the interval bounds are the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles (2.5% and 97.5% by default).
    The reference draws with ``np.random.randint`` after ``np.random.seed(42)``: same method,
    different random numbers.

    Args:
      table: rows of (image, label).
      metric: the score column.
      n_bootstraps: number of bootstrap samples.
      seed: seed of the generator.
      confidence: coverage of the interval, in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_bootstraps < 1:
        raise ValueError(f"n_bootstraps must be positive, got {n_bootstraps}")
    scores = class_level(table, metric)
    if scores.labels.size == 0:
        raise ValueError(f"the table has no {metric!r} scores to bootstrap")
    rng = np.random.default_rng(seed)
    samples = np.stack(
        [resample_mean(row[~np.isnan(row)], n_bootstraps, rng) for row in scores.subject_scores],
        axis=1,
    )
    percentiles = [50 * (1 - confidence), 50 * (1 + confidence)]
    low, high = np.percentile(samples, percentiles, axis=0)
    class_low, class_high = np.percentile(samples.mean(axis=1), percentiles)
    return BootstrapScores(
        labels=scores.labels,
        mean=scores.mean,
        ci_low=low,
        ci_high=high,
        class_mean=float(scores.mean.mean()),
        class_mean_ci_low=float(class_low),
        class_mean_ci_high=float(class_high),
        bootstrap_means=samples,
    )


def relative_drop(in_species, out_species) -> np.ndarray:
    """Cross-species change ``(out - in) / in`` (negative for a drop), elementwise.

    Args:
      in_species: scores on the training species (e.g. class-level DSC per label).
      out_species: the same scores on another species.

    Returns:
      float64 array; NaN where `in_species` is 0.
    """
    in_species = np.asarray(in_species, dtype=np.float64)
    out_species = np.asarray(out_species, dtype=np.float64)
    if in_species.shape != out_species.shape:
        raise ValueError(
            f"in_species and out_species must have the same shape, "
            f"got {in_species.shape} and {out_species.shape}"
        )
    return np.divide(out_species - in_species, in_species,
                     out=np.full(in_species.shape, np.nan), where=in_species != 0)
