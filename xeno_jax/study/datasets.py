"""The datasets, catalogs and data specs of the study's runs.

Functions named ``ensure_*`` make what is missing (a simulated dataset is built, our nested
cross-validation written to ``<data_dir>/specs``) once, under a file lock
(`xeno_jax.study.workdir.build_once`; in a job of several processes, process 0 first); the
others only read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import tensorflow_datasets as tfds

import data_builders
from xeno_jax.data import Catalog, DataSpec, Record, nested_cross_validation, spec_name
from xeno_jax.study.workdir import build_once

PHYSIOLOGICAL_SPLIT = "physiological"


def data_dir_of(config: ml_collections.ConfigDict) -> Path:
    return Path(os.path.expanduser(config.data.data_dir))


def dataset_name(species: str, dataset: str) -> str:
    return f"{species}/{dataset}"


def lock_path(data_dir: str | os.PathLike, *parts: str) -> Path:
    """``<data_dir>/.locks/<parts joined by _>.lock``: where processes sharing a data
    directory wait for one another (`xeno_jax.study.workdir.build_once`)."""
    return Path(data_dir) / ".locks" / ("_".join(parts) + ".lock")


def ensure_dataset(species: str, dataset: str, data_dir: str | os.PathLike) -> None:
    """Builds a species dataset if it is not there yet (simulated configs only), once.

    Raises:
      FileNotFoundError: for a missing dataset that is not simulated (it says how to build it).
    """
    builder = data_builders.builder(species, dataset, data_dir=str(data_dir))

    def build():
        if builder.builder_config.source != "simulated":
            raise FileNotFoundError(
                f"dataset {dataset_name(species, dataset)} is not built in {data_dir}: build it "
                f"with `python -m experiments.build_data --species={species} --dataset={dataset} "
                f"--manual_dir=<your data> --data_dir={data_dir}`")
        builder.download_and_prepare()

    build_once(lock_path(data_dir, "dataset", species, dataset), builder.is_prepared, build,
               what=f"dataset {dataset_name(species, dataset)} in {data_dir}")


def ensure_catalog(species: Sequence[str], dataset: str, data_dir: str | os.PathLike,
                   splits: Sequence[str] | None = (PHYSIOLOGICAL_SPLIT,)) -> Catalog:
    """A catalog over the given splits (those a species has; None: all) of several species'
    datasets, each built first if it is missing (`ensure_dataset`)."""
    refs = []
    for sp in species:
        ensure_dataset(sp, dataset, data_dir)
        available = tfds.builder(dataset_name(sp, dataset), data_dir=str(data_dir)).info.splits
        refs += [f"{dataset_name(sp, dataset)}:{s}" for s in (sorted(available) if splits is None
                                                              else splits) if s in available]
    return Catalog(refs, data_dir)


def semantic_images(catalog: Catalog, species: str) -> list[Record]:
    """A species' physiological multi-organ images: what segmentation networks train on."""
    return catalog.filter(species=species, experiment="semantic",
                          perfusion_state=PHYSIOLOGICAL_SPLIT)


def ensure_outer_spec(catalog: Catalog, species: str, outer: int, data_dir: str | os.PathLike,
                      dataset: str, spec: str = "") -> DataSpec:
    """The data spec of one outer fold.

    Args:
      spec: ``""``: our nested cross-validation (`ensure_nested_specs`); a folder: the reference's
        spec file of the species and outer fold in it (`spec_name`, e.g. the paper's
        ``pig_semantic-only_5folds_nested-0-2_mapping-12_seed-0.json``); a file: that spec.
    """
    if spec:
        path = Path(os.path.expanduser(spec))
        return DataSpec.load(path / spec_name(species, outer) if path.is_dir() else path)
    specs = ensure_nested_specs(catalog, species, data_dir, dataset)
    if not 0 <= outer < len(specs):
        raise ValueError(f"outer fold {outer}: expected 0..{len(specs) - 1}")
    return specs[outer]


def ensure_nested_specs(catalog: Catalog, species: str, data_dir: str | os.PathLike,
                        dataset: str) -> list[DataSpec]:
    """The species' 3 outer data specs, read from ``<data_dir>/specs`` or made and written."""
    folder = Path(data_dir) / "specs" / dataset
    paths = [folder / spec_name(species, i) for i in range(3)]

    def write():
        specs = nested_cross_validation(semantic_images(catalog, species), seed=0)
        folder.mkdir(parents=True, exist_ok=True)
        for spec, path in zip(specs, paths, strict=True):
            spec.save(path)

    build_once(lock_path(data_dir, "specs", species, dataset),
               lambda: all(p.exists() for p in paths), write,
               what=f"data specs of {dataset_name(species, dataset)}")
    return [DataSpec.load(p) for p in paths]
