"""Segmentation metrics of the reference evaluation: DSC, NSD and ASD inside a valid mask.

Masking follows ``method.md`` C1: invalid pixels go to an extra dummy class in both the
prediction and the reference, and that class is dropped afterwards. Invalid pixels are therefore
never a true positive, false positive or false negative, and a class boundary next to an invalid
region counts like a boundary next to any other class. Per image, the reference reports scores
only for the *used labels* (the reference labels inside the mask), with NaN replaced by 0
(`used_label_scores`).

The confusion matrix and DSC are pure JAX (jittable, vmappable). NSD and ASD follow MONAI's
``compute_surface_dice`` and ``SurfaceDistanceMetric(symmetric=True)`` and run on the host with
SciPy's exact Euclidean distance transform.

Label maps are integer arrays ``(..., H, W)`` with labels ``0 .. num_classes - 1`` wherever
`valid` (a boolean array of the same shape) is true; anything may stand where it is false.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from xeno_jax.labels import SPECIES_12, LabelMapping

NSD_TOLERANCES_SPECIES_12: Mapping[str, float] = MappingProxyType({
    "background": 4.0,
    "stomach": 5.0,
    "small_bowel": 6.0,
    "colon": 6.0,
    "liver": 4.0,
    "pancreas": 7.0,
    "kidney": 4.0,
    "spleen": 4.0,
    "omentum": 8.0,
    "lung": 5.0,
    "skin": 4.0,
    "peritoneum": 8.0,
})
"""NSD tolerance in pixels per `SPECIES_12` class name: our choice, not the reference's.

The reference uses the MIA2022 inter-rater tolerances: per class, the mean symmetric distance
between the boundaries two annotators drew on the same image, averaged per pig and then over pigs.
Those values are not public. We set tolerances of the same kind, a few pixels of boundary
disagreement: 4 px where the outline is sharp and high-contrast (background, liver, kidney,
spleen, skin), 5-6 px where organs fold or hide each other (stomach, lung, small bowel, colon),
and 7-8 px for thin or diffuse tissue whose extent raters disagree on (pancreas, omentum,
peritoneum). NSD values are hence comparable within this framework, not to the paper's numbers.
Pass your own table to `nsd_tolerances` to override them.
"""

METRICS = ("dice", "nsd", "asd")
"""Metric names `evaluate_images` understands."""


def nsd_tolerances(
    label_mapping: LabelMapping = SPECIES_12,
    table: Mapping[str, float] = NSD_TOLERANCES_SPECIES_12,
) -> np.ndarray:
    """Per-class NSD tolerances in index order.

    Args:
      label_mapping: gives the class names, in index order.
      table: tolerance in pixels per class name.

    Returns:
      float64 array ``(label_mapping.num_classes,)``.
    """
    missing = [name for name in label_mapping.label_names if name not in table]
    if missing:
        raise ValueError(
            f"no NSD tolerance for the labels {missing}; the table has {sorted(table)}"
        )
    return np.array([table[name] for name in label_mapping.label_names], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Input checks.


def _check_label_maps(num_classes: int, valid, **label_maps) -> None:
    """Raises ValueError for mismatched shapes, wrong dtypes or labels out of range in `valid`.

    The range check needs concrete values and is skipped while tracing.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    shapes = {name: np.shape(x) for name, x in label_maps.items()} | {"valid": np.shape(valid)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{', '.join(shapes)} must have the same shape, got {shapes}")
    if len(shapes["valid"]) < 2:
        raise ValueError(f"label maps must have shape (..., H, W), got {shapes['valid']}")
    if valid.dtype != bool:
        raise ValueError(f"valid must be a boolean mask, got dtype {valid.dtype}")
    for name, labels in label_maps.items():
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} must hold integer labels, got dtype {labels.dtype}")
        if isinstance(labels, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
            continue
        out_of_range = valid & ((labels < 0) | (labels >= num_classes))
        if np.any(out_of_range):
            bad = np.unique(np.asarray(labels)[np.asarray(out_of_range)])
            raise ValueError(
                f"{name} holds the labels {bad.tolist()} inside valid; "
                f"expected 0..{num_classes - 1}"
            )


def _check_tolerances(tolerances) -> np.ndarray:
    tolerances = np.asarray(tolerances, dtype=np.float64)
    if tolerances.ndim != 1 or tolerances.size == 0:
        raise ValueError(f"tolerances must be one value per class, got shape {tolerances.shape}")
    if not np.all(np.isfinite(tolerances)) or np.any(tolerances < 0):
        raise ValueError(f"tolerances must be finite and >= 0, got {tolerances.tolist()}")
    return tolerances


# --------------------------------------------------------------------------------------------
# Overlap metrics (JAX).


@functools.partial(jax.jit, static_argnames="num_classes")
def _confusion_matrix(pred, ref, valid, num_classes: int):
    size = num_classes + 1  # the last class is the dummy that collects the invalid pixels
    index = jnp.where(valid, ref, num_classes) * size + jnp.where(valid, pred, num_classes)
    pixels = index.reshape(-1, index.shape[-2] * index.shape[-1])
    counts = jax.vmap(functools.partial(jnp.bincount, length=size * size))(pixels)
    counts = counts.reshape(*index.shape[:-2], size, size)
    return counts[..., :num_classes, :num_classes]


def confusion_matrix(pred, ref, valid, num_classes: int) -> jax.Array:
    """Per-image confusion matrix over the valid pixels.

    Args:
      pred: predicted labels ``(..., H, W)``, integer.
      ref: reference labels, same shape.
      valid: boolean mask of the pixels to count, same shape.
      num_classes: number of classes K.

    Returns:
      int32 counts ``(..., K, K)``: row = reference class, column = predicted class.
    """
    pred, ref, valid = jnp.asarray(pred), jnp.asarray(ref), jnp.asarray(valid)
    _check_label_maps(num_classes, valid, pred=pred, ref=ref)
    return _confusion_matrix(pred, ref, valid, num_classes)


def dice_from_confusion_matrix(confusion) -> jax.Array:
    """Per-class DSC ``2 TP / (|ref| + |pred|)`` from confusion matrices ``(..., K, K)``.

    Returns:
      float ``(..., K)``; NaN for a class absent from both reference and prediction.
    """
    confusion = jnp.asarray(confusion)
    true_positives = jnp.diagonal(confusion, axis1=-2, axis2=-1)
    sizes = confusion.sum(axis=-1) + confusion.sum(axis=-2)
    return jnp.where(sizes > 0, 2 * true_positives / jnp.maximum(sizes, 1), jnp.nan)


def dice(pred, ref, valid, num_classes: int) -> jax.Array:
    """Per-class Dice similarity coefficient inside `valid`.

    Args:
      pred: predicted labels ``(..., H, W)``, integer.
      ref: reference labels, same shape.
      valid: boolean mask of the pixels to score, same shape.
      num_classes: number of classes K.

    Returns:
      float ``(..., K)``: NaN for a class absent from both `pred` and `ref` inside `valid`, 0
      for a class in only one of them. (MONAI's ``compute_dice`` gives NaN whenever the reference
      lacks the class; the per-image scores of `used_label_scores` are the same either way.)
    """
    return dice_from_confusion_matrix(confusion_matrix(pred, ref, valid, num_classes))


FULL_LABEL_METRICS = ("full_dice", "full_precision", "full_recall", "full_false_share")


def full_label_scores(pred, labels_full, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class scores against every pixel's true class, as simulated data knows it.

    A polygon annotation marks one organ and leaves the rest invalid, so a prediction of that
    organ everywhere scores DSC 1 on it; against full labels the same prediction has a low
    precision and calls most other tissue that organ.

    Args:
      pred: predicted labels ``(B, H, W)``.
      labels_full: every pixel's class, same shape; values >= `num_classes` are not counted.
      num_classes: number of classes K.

    Returns:
      float64 ``(B, K)`` arrays (NaN where undefined): ``full_dice``, ``full_precision``
      (TP / predicted), ``full_recall`` (TP / reference) and ``full_false_share`` (the share of
      the pixels of other classes predicted as the class).
    """
    labels_full = jnp.asarray(labels_full)
    valid = labels_full < num_classes
    confusion = np.asarray(confusion_matrix(pred, jnp.where(valid, labels_full, 0), valid,
                                            num_classes), np.float64)
    hits = np.diagonal(confusion, axis1=-2, axis2=-1)
    predicted, reference = confusion.sum(axis=-2), confusion.sum(axis=-1)
    others = confusion.sum(axis=(-2, -1))[..., None] - reference

    def ratio(numerator, denominator):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)

    return {"full_dice": np.asarray(dice_from_confusion_matrix(confusion), np.float64),
            "full_precision": ratio(hits, predicted), "full_recall": ratio(hits, reference),
            "full_false_share": ratio(predicted - hits, others)}


def used_labels(ref, valid, num_classes: int) -> jax.Array:
    """Which classes occur in the reference inside `valid` (the reference's ``used_labels``).

    Returns:
      bool ``(..., K)``.
    """
    ref, valid = jnp.asarray(ref), jnp.asarray(valid)
    _check_label_maps(num_classes, valid, ref=ref)
    hits = (ref[..., None] == jnp.arange(num_classes)) & valid[..., None]
    return jnp.any(hits, axis=(-3, -2))


def used_label_scores(scores, used) -> tuple[jax.Array, jax.Array]:
    """Per-image scores the way the reference reports them.

    Args:
      scores: per-class scores ``(..., K)``, NaN where undefined.
      used: bool ``(..., K)`` from `used_labels`.

    Returns:
      ``(per_label, image)``: `per_label` ``(..., K)`` holds the scores of the used labels with
      NaN replaced by 0 (a used label that was never predicted scores 0) and NaN elsewhere;
      `image` ``(...)`` is their mean over the used labels, NaN for an image without any.
      NumPy scores give NumPy results; anything else goes through `jax.numpy` (jittable).
    """
    xp = np if isinstance(scores, np.ndarray) else jnp
    used = xp.asarray(used)
    per_label = xp.where(used, xp.where(xp.isnan(scores), 0.0, scores), np.nan)
    count = used.sum(axis=-1)
    total = xp.where(used, per_label, 0.0).sum(axis=-1)
    return per_label, xp.where(count > 0, total / xp.maximum(count, 1), np.nan)


# --------------------------------------------------------------------------------------------
# Boundary metrics (NumPy / SciPy on the host).

_CROSS = ndimage.generate_binary_structure(2, 1)


def _class_boundaries(labels: np.ndarray, valid: np.ndarray, num_classes: int) -> np.ndarray:
    """Boundary pixels per class: ``(N, H, W)`` labels -> bool ``(N, K, H, W)``.

    A boundary pixel belongs to the class (inside `valid`) and has a 4-neighbour that does not,
    or lies on the image border: MONAI's ``mask ^ binary_erosion(mask)``.
    """
    masks = (labels[:, None] == np.arange(num_classes)[:, None, None]) & valid[:, None]
    structure = _CROSS.reshape(1, 1, 3, 3)
    return masks & ~ndimage.binary_erosion(masks, structure, border_value=0)


def _boundary_distances(
    pred_edges: np.ndarray, ref_edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each pred boundary pixel to the ref boundary, and from ref to pred.

    A side without boundary pixels gives no distances and makes the other side's all inf.
    """
    if not (pred_edges.any() and ref_edges.any()):
        return np.full(pred_edges.sum(), np.inf), np.full(ref_edges.sum(), np.inf)
    either = pred_edges | ref_edges  # all boundary pixels lie in its bounding box: crop to it
    rows, columns = np.flatnonzero(either.any(axis=1)), np.flatnonzero(either.any(axis=0))
    box = np.s_[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    pred_edges, ref_edges = pred_edges[box], ref_edges[box]
    to_ref = ndimage.distance_transform_edt(~ref_edges)[pred_edges]
    to_pred = ndimage.distance_transform_edt(~pred_edges)[ref_edges]
    return to_ref, to_pred


def _per_class_boundary_scores(
    pred, ref, valid, num_classes: int,
    score: Callable[[int, np.ndarray, np.ndarray], float],
) -> np.ndarray:
    """`score(class, pred->ref distances, ref->pred distances)` per image and class.

    Returns:
      float64 ``(..., K)``; NaN where the class is absent from both pred and ref.
    """
    pred, ref, valid = np.asarray(pred), np.asarray(ref), np.asarray(valid)
    _check_label_maps(num_classes, valid, pred=pred, ref=ref)
    image_shape = pred.shape[-2:]
    pred_edges = _class_boundaries(pred.reshape(-1, *image_shape), valid.reshape(-1, *image_shape),
                                   num_classes)
    ref_edges = _class_boundaries(ref.reshape(-1, *image_shape), valid.reshape(-1, *image_shape),
                                  num_classes)
    scores = np.full(pred_edges.shape[:2], np.nan)
    present = pred_edges.any(axis=(-2, -1)) | ref_edges.any(axis=(-2, -1))
    for image, k in zip(*np.nonzero(present), strict=True):
        scores[image, k] = score(k, *_boundary_distances(pred_edges[image, k], ref_edges[image, k]))
    return scores.reshape(*pred.shape[:-2], num_classes)


def normalized_surface_dice(pred, ref, valid, tolerances: Sequence[float]) -> np.ndarray:
    """Per-class normalized surface dice (NSD) inside `valid`, as MONAI's ``compute_surface_dice``.

    Per class, boundary pixels of the prediction and of the reference are taken after the
    dummy-class masking; NSD = (pred boundary pixels within tau of the ref boundary + ref boundary
    pixels within tau of the pred boundary) / (pred boundary pixels + ref boundary pixels), with
    Euclidean pixel distances and ``<=``.

    Args:
      pred: predicted labels ``(..., H, W)``, integer.
      ref: reference labels, same shape.
      valid: boolean mask of the pixels to score, same shape.
      tolerances: tau in pixels per class (length K = the number of classes), e.g.
        `nsd_tolerances()`.

    Returns:
      float64 ``(..., K)``: NaN for a class absent from both (no boundary at all: MONAI's
      0/0), 0 for a class present in only one (every distance is inf, so none is within tau).
    """
    tolerances = _check_tolerances(tolerances)

    def score(k, to_ref, to_pred):
        distances = np.concatenate([to_ref, to_pred])
        return np.count_nonzero(distances <= tolerances[k]) / distances.size

    return _per_class_boundary_scores(pred, ref, valid, tolerances.size, score)


def average_surface_distance(pred, ref, valid, num_classes: int) -> np.ndarray:
    """Per-class symmetric average surface distance (ASD) in pixels inside `valid`.

    The mean over the pred->ref and ref->pred boundary distances together, as MONAI's
    ``SurfaceDistanceMetric(symmetric=True)``. Where MONAI gives inf (the class is in only one of
    pred and ref), the reference substitutes the largest finite ASD of the image, or the image
    diagonal ``sqrt(H^2 + W^2)`` if no class has a finite one; so does this function.

    Args:
      pred: predicted labels ``(..., H, W)``, integer.
      ref: reference labels, same shape.
      valid: boolean mask of the pixels to score, same shape.
      num_classes: number of classes K.

    Returns:
      float64 ``(..., K)``; NaN for a class absent from both.
    """
    asd = _per_class_boundary_scores(
        pred, ref, valid, num_classes,
        lambda k, to_ref, to_pred: np.concatenate([to_ref, to_pred]).mean(),
    )
    largest = np.max(np.where(np.isfinite(asd), asd, -np.inf), axis=-1, keepdims=True)
    fill = np.where(np.isfinite(largest), largest, math.hypot(*np.shape(pred)[-2:]))
    return np.where(np.isinf(asd), fill, asd)


# --------------------------------------------------------------------------------------------
# All metrics of a batch.


def evaluate_images(
    pred, ref, valid, num_classes: int, *,
    metrics: Sequence[str] = ("dice", "nsd"),
    tolerances: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """The reference's per-image evaluation of a batch (``evaluate_images`` in htc).

    Args:
      pred: predicted labels ``(B, H, W)`` (the argmax of the ensemble probabilities).
      ref: reference labels, same shape.
      valid: boolean mask of the annotated pixels, same shape.
      num_classes: number of classes K.
      metrics: any of `METRICS`.
      tolerances: NSD tolerances per class; default `nsd_tolerances()` (12 classes).

    Returns:
      NumPy arrays: ``used_labels`` bool ``(B, K)``, ``confusion_matrix`` ``(B, K, K)`` and per
      metric ``<name>`` ``(B, K)`` (used labels only, see `used_label_scores`) and
      ``<name>_image`` ``(B,)``. Feed them to `ScoreTable.from_images`.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {METRICS}")
    confusion = confusion_matrix(pred, ref, valid, num_classes)
    used = np.asarray(used_labels(ref, valid, num_classes))
    per_class = {}
    if "dice" in metrics:
        per_class["dice"] = np.asarray(dice_from_confusion_matrix(confusion), np.float64)
    if "nsd" in metrics:
        tolerances = nsd_tolerances() if tolerances is None else tolerances
        if len(tolerances) != num_classes:
            raise ValueError(
                f"tolerances has {len(tolerances)} values; expected one per class ({num_classes})"
            )
        per_class["nsd"] = normalized_surface_dice(pred, ref, valid, tolerances)
    if "asd" in metrics:
        per_class["asd"] = average_surface_distance(pred, ref, valid, num_classes)
    results = {"used_labels": used, "confusion_matrix": np.asarray(confusion)}
    for name, scores in per_class.items():
        results[name], results[f"{name}_image"] = used_label_scores(scores, used)
    return results
