"""Scoring networks on images: the ensemble predictor, score tables, example predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import ml_collections
import numpy as np

from xeno_jax.data import Catalog, Record, evaluation_batches
from xeno_jax.evaluate import (
    FULL_LABEL_METRICS,
    ScoreTable,
    class_level,
    evaluate_images,
    full_label_scores,
    nsd_tolerances,
)
from xeno_jax.evaluate.perfusion import median_per_label
from xeno_jax.io import atomic_write
from xeno_jax.labels import SPECIES_12
from xeno_jax.models import build_model
from xeno_jax.spectra import sto2, tivita_wavelengths
from xeno_jax.train.parallel import make_mesh
from xeno_jax.train.predict import predictor as data_parallel_predictor

REFERENCE_HEIGHT = 480  # NSD tolerances are in pixels of 480 x 640 images
STO2_COLUMNS = ("median_sto2", "vendor_sto2")
"""Score-table columns that describe a region's StO2, not a score."""


def predictor(configs_and_variables: Sequence[tuple[ml_collections.ConfigDict | nn.Module, dict]]):
    """``predict(features) -> probabilities``: the mean softmax of the models (a fold ensemble,
    or one model), through the training loop's data-parallel `xeno_jax.train.predictor`.

    Each model is given by its run config or as a module (a converted network's, from
    `xeno_jax.models.load_pretrained`); the mesh and launcher are those of the first run config
    (all devices and shard_map if there is none).
    """
    configs = [c for c, _ in configs_and_variables if not isinstance(c, nn.Module)]
    models = [c if isinstance(c, nn.Module) else build_model(c.model)
              for c, _ in configs_and_variables]
    num_devices, backend = ((configs[0].parallel.num_devices, configs[0].parallel.backend)
                            if configs else (0, "shard_map"))
    bind = data_parallel_predictor(models, make_mesh(num_devices), backend=backend)
    return bind([variables for _, variables in configs_and_variables])


def score_images(catalog: Catalog, records: Sequence[Record], predict, batch_size: int, *,
                 metrics: Sequence[str] = ("dice", "nsd")) -> ScoreTable:
    """Per (image, label) scores of an ensemble on `records`, with each region's median StO2.

    The rows are the annotated labels of each image, scored inside the annotation (`metrics`)
    and, where the dataset knows every pixel's class (simulated data), against the full labels
    too (`FULL_LABEL_METRICS`: DSC, precision, recall and the share of other tissue called the
    label; NaN without full labels).
    NSD tolerances (pixels of 480 x 640 images) are scaled to the images' height; the median
    StO2 is over the region's pixels of the vendor's StO2 image where the dataset has the
    vendor's parameter images, else of the open re-implementation (`xeno_jax.spectra.sto2`).
    The column ``vendor_sto2`` says which: 1 the vendor's, 0 the open one.
    """
    tables = []
    for batch_records, batch in evaluation_batches(catalog, records, batch_size):
        n = len(batch_records)
        probabilities = predict(batch["features"])[:n]
        labels, valid = batch["labels"][:n], batch["valid"][:n]
        scale = labels.shape[1] / REFERENCE_HEIGHT
        results = evaluate_images(np.argmax(probabilities, -1), labels, valid,
                                  SPECIES_12.num_classes, metrics=metrics,
                                  tolerances=nsd_tolerances() * scale)
        vendor = batch["vendor_sto2"][:n]
        has_vendor = ~np.isnan(vendor).all(axis=(1, 2))
        index = np.where(has_vendor[:, None, None], vendor,
                         np.asarray(sto2(batch["features"][:n])))
        medians = np.asarray(median_per_label(index, labels, valid, SPECIES_12.num_classes))
        full = (full_label_scores(np.argmax(probabilities, -1), batch["labels_full"][:n],
                                  SPECIES_12.num_classes) if "labels_full" in batch
                else dict.fromkeys(FULL_LABEL_METRICS, np.full(medians.shape, np.nan)))
        tables.append(ScoreTable.from_images(
            [r.image_name for r in batch_records], [r.subject for r in batch_records],
            results["used_labels"], **{m: results[m] for m in metrics}, **full,
            median_sto2=medians,
            vendor_sto2=np.broadcast_to(has_vendor[:, None], medians.shape).astype(float)))
    if not tables:
        return ScoreTable(np.array([], str), np.array([], str), np.array([], int),
                          {m: np.array([]) for m in (*metrics, *FULL_LABEL_METRICS,
                                                      *STO2_COLUMNS)})
    return ScoreTable.concatenate(tables)


def save_examples(path: Path, catalog: Catalog, records: Sequence[Record], predict,
                  count: int = 3) -> None:
    """Saves false-colour images, labels and predictions of the first `count` images."""
    records = list(records)[:count]
    if not records:
        return
    rows = next(iter(evaluation_batches(catalog, records, len(records))))[1]
    features = rows["features"]
    bands = [int(np.argmin(np.abs(tivita_wavelengths() - nm))) for nm in (650, 560, 500)]
    rgb = features[..., bands]
    rgb = np.clip(rgb / np.percentile(rgb, 99, axis=(1, 2, 3), keepdims=True), 0, 1) ** 0.7
    with atomic_write(path) as f:
        np.savez(f, rgb=rgb.astype(np.float32), labels=rows["labels"], valid=rows["valid"],
                 prediction=np.argmax(predict(features), -1).astype(np.uint8),
                 image_names=np.array([r.image_name for r in records]))


def class_means(table: ScoreTable, metric: str = "dice") -> np.ndarray:
    """Class-level mean of each label (`xeno_jax.evaluate.class_level`)."""
    return class_level(table, metric).mean
