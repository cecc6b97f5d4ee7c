"""Data: catalogs of TFDS species datasets, nested cross-validation, sampling, input pipelines."""

from xeno_jax.data.catalog import Catalog, DatasetRef, Record
from xeno_jax.data.pipeline import evaluation_batches, to_device, train_iterator
from xeno_jax.data.sampling import LabelBalancedSampler
from xeno_jax.data.splits import DataSpec, Fold, nested_cross_validation, spec_name

__all__ = [
    "Catalog", "DataSpec", "DatasetRef", "Fold", "LabelBalancedSampler", "Record",
    "evaluation_batches", "nested_cross_validation", "spec_name", "to_device", "train_iterator",
]
