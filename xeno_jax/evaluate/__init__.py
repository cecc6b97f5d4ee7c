"""Evaluation as in the paper: metrics, fold ensembles, aggregation, DSC against perfusion."""

from xeno_jax.evaluate.aggregate import (
    BootstrapScores,
    ClassScores,
    ScoreTable,
    SubjectScores,
    bootstrap_class_level,
    class_level,
    image_level,
    relative_drop,
    resample_mean,
)
from xeno_jax.evaluate.ensemble import average_probabilities, ensemble_predict
from xeno_jax.evaluate.metrics import (
    FULL_LABEL_METRICS,
    METRICS,
    NSD_TOLERANCES_SPECIES_12,
    average_surface_distance,
    confusion_matrix,
    dice,
    dice_from_confusion_matrix,
    evaluate_images,
    full_label_scores,
    normalized_surface_dice,
    nsd_tolerances,
    used_label_scores,
    used_labels,
)
from xeno_jax.evaluate.perfusion import (
    ParameterCurves,
    interpolate_on_grid,
    median_per_label,
    parameter_curves,
    region_median,
)

__all__ = [
    "FULL_LABEL_METRICS", "METRICS", "NSD_TOLERANCES_SPECIES_12", "BootstrapScores", "ClassScores",
    "ParameterCurves", "ScoreTable", "SubjectScores", "average_probabilities",
    "average_surface_distance", "bootstrap_class_level", "class_level", "confusion_matrix", "dice",
    "dice_from_confusion_matrix", "ensemble_predict", "evaluate_images", "full_label_scores",
    "image_level", "interpolate_on_grid", "median_per_label", "normalized_surface_dice",
    "nsd_tolerances", "parameter_curves", "region_median", "relative_drop", "resample_mean",
    "used_label_scores", "used_labels",
]
