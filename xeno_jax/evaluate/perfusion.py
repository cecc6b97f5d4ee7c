"""Segmentation performance against perfusion: DSC over the median StO2 of each region.

``method.md`` C3 (htc ``species_evaluation.parameter_evaluation``): per (label, subject), the
per-image scores are interpolated linearly onto a grid over StO2 in [0, 1] without extrapolation;
then, per label, subjects are resampled with replacement and the NaN-skipping mean over subjects
gives one curve per bootstrap sample, summarised by its mean and 2.5/97.5% quantiles per grid
point.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np

from xeno_jax.evaluate.aggregate import ScoreTable, resample_mean


def region_median(values, mask):
    """Median of `values` over a region, ignoring NaN values. Jittable.

    Args:
      values: ``(..., H, W)`` e.g. an StO2 map.
      mask: bool ``(..., H, W)``, the region.

    Returns:
      ``(...)`` medians; NaN for an empty region.
    """
    values, mask = jnp.asarray(values), jnp.asarray(mask)
    if values.shape != mask.shape or mask.dtype != bool:
        raise ValueError(
            f"mask must be a bool array of the shape of values {values.shape}, "
            f"got {mask.dtype} {mask.shape}"
        )
    return jnp.nanmedian(jnp.where(mask, values, jnp.nan), axis=(-2, -1))


def median_per_label(values, labels, valid, num_classes: int):
    """Median of `values` over each label's valid pixels (the reference's ``median_sto2``).

    Args:
      values: ``(..., H, W)`` e.g. an StO2 map.
      labels: int ``(..., H, W)`` reference labels.
      valid: bool ``(..., H, W)``.
      num_classes: number of classes K.

    Returns:
      ``(..., K)`` medians; NaN for a label without valid pixels.
    """
    labels, valid = jnp.asarray(labels), jnp.asarray(valid)
    masks = (labels[..., None, :, :] == jnp.arange(num_classes)[:, None, None])
    masks = masks & valid[..., None, :, :]
    values = jnp.broadcast_to(jnp.asarray(values)[..., None, :, :], masks.shape)
    return region_median(values, masks)


def interpolate_on_grid(x, y, grid) -> np.ndarray:
    """Piecewise-linear y(x) on `grid`, NaN outside the observed range of x (no extrapolation).

    Observations at the same x are averaged first. With a single distinct x there is nothing to
    interpolate: as in the reference, the grid point nearest to it takes its value.

    Args:
      x: ``(n,)`` e.g. the median StO2 of one subject's images of one label.
      y: ``(n,)`` the scores at x.
      grid: ``(P,)`` ascending.

    Returns:
      float64 ``(P,)``.
    """
    x, y, grid = (np.asarray(a, dtype=np.float64) for a in (x, y, grid))
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(
            f"x and y must be non-empty 1-D arrays of one shape, got {x.shape} and {y.shape}"
        )
    for name, a in (("x", x), ("y", y)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {a.tolist()}")
    points, index = np.unique(x, return_inverse=True)
    means = np.bincount(index, weights=y) / np.bincount(index)
    if points.size == 1:
        curve = np.full(grid.shape, np.nan)
        curve[np.argmin(np.abs(grid - points[0]))] = means[0]
        return curve
    return np.interp(grid, points, means, left=np.nan, right=np.nan)


@dataclasses.dataclass(frozen=True, eq=False)
class ParameterCurves:
    """Scores over a parameter grid, per label.

    Attributes:
      labels: ``(L,)`` label indices, ascending.
      subjects: ``(S,)`` subject names, sorted.
      grid: ``(P,)`` parameter values.
      subject_curves: ``(L, S, P)`` interpolated scores; NaN outside a subject's range and for
        subjects without the label.
      present: bool ``(L, S)``, which subjects have the label.
      mean: ``(L, P)`` NaN-skipping mean over subjects.
      bootstrap_mean: ``(L, P)`` mean over bootstrap samples.
      ci_low, ci_high: ``(L, P)`` the 2.5% and 97.5% quantiles of the bootstrap samples.
    """

    labels: np.ndarray
    subjects: np.ndarray
    grid: np.ndarray
    subject_curves: np.ndarray
    present: np.ndarray
    mean: np.ndarray
    bootstrap_mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def parameter_curves(
    table: ScoreTable,
    parameter: str = "median_sto2",
    metric: str = "dice",
    *,
    grid_size: int = 100,
    n_bootstraps: int = 1000,
    seed: int = 42,
) -> ParameterCurves:
    """Scores against a region parameter (DSC against median StO2 by default), bootstrapped.

    Labels are processed in ascending order, drawing from one ``np.random.default_rng(seed)``
    (the reference: ``np.random.randint`` after ``np.random.seed(42)``).

    Args:
      table: rows of (image, label) with the `metric` and `parameter` columns.
      parameter: the column on the x axis; the grid spans [0, 1].
      metric: the score column.
      grid_size: number of grid points.
      n_bootstraps: number of bootstrap samples.
      seed: seed of the generator.
    """
    if len(table) == 0:
        raise ValueError("parameter_curves needs a non-empty table")
    x, y = table.column(parameter), table.column(metric)
    labels, label_index = np.unique(table.label, return_inverse=True)
    subjects, subject_index = np.unique(table.subject, return_inverse=True)
    grid = np.linspace(0.0, 1.0, grid_size)

    curves = np.full((labels.size, subjects.size, grid_size), np.nan)
    present = np.zeros((labels.size, subjects.size), dtype=bool)
    group = label_index * subjects.size + subject_index
    order = np.argsort(group, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(group[order])) + 1):
        label, subject = divmod(group[rows[0]], subjects.size)
        curves[label, subject] = interpolate_on_grid(x[rows], y[rows], grid)
        present[label, subject] = True

    rng = np.random.default_rng(seed)
    samples = np.stack(
        [resample_mean(c[p], n_bootstraps, rng) for c, p in zip(curves, present, strict=True)]
    )  # (L, n_bootstraps, P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # grid points without data stay NaN
        mean = np.nanmean(curves, axis=1)
        bootstrap_mean = np.nanmean(samples, axis=1)
        ci_low, ci_high = np.nanquantile(samples, [0.025, 0.975], axis=1)
    return ParameterCurves(
        labels=labels, subjects=subjects, grid=grid, subject_curves=curves, present=present,
        mean=mean, bootstrap_mean=bootstrap_mean, ci_low=ci_low, ci_high=ci_high,
    )
