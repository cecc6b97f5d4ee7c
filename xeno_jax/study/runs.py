"""One training run of a configuration, and what it needs: datasets, data specs, banks.

Everything a run needs is found or made deterministically, so runs (and the study) can be
interrupted and restarted:

- datasets: the species' TFDS builders (simulated configs are built when missing);
- data specs: the nested cross-validation of a species' physiological ``semantic`` images,
  written once to ``<data_dir>/specs`` in the reference's format;
- projection banks: learnt once per (pathology, source species, dataset) and stored in
  ``<data_dir>/projections`` (method.md A2 says which images pair up).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

import data_builders
from xeno_jax.augment.pipeline import build_pipeline, steps_from_config
from xeno_jax.data import (
    Catalog,
    DataSpec,
    Record,
    evaluation_batches,
    nested_cross_validation,
    spec_name,
    train_iterator,
)
from xeno_jax.evaluate import (
    ScoreTable,
    average_probabilities,
    class_level,
    evaluate_images,
    nsd_tolerances,
)
from xeno_jax.evaluate.perfusion import median_per_label
from xeno_jax.io import atomic_write
from xeno_jax.labels import ICG_LABELS, MALPERFUSED_LABELS, SPECIES_12
from xeno_jax.models import build_model
from xeno_jax.projections import ProjectionBank
from xeno_jax.projections.dataset import learn_bank
from xeno_jax.spectra import sto2, tivita_wavelengths
from xeno_jax.study.workdir import build_once
from xeno_jax.train import train
from xeno_jax.train.loop import restore_final_variables
from xeno_jax.train.parallel import make_mesh

REFERENCE_HEIGHT = 480  # NSD tolerances are in pixels of 480 x 640 images
DONE_FILE = "done.json"
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
    """Builds a species dataset if it is not there yet (simulated configs only), once."""
    builder = data_builders.builder(species, dataset, data_dir=str(data_dir))
    if builder.is_prepared():
        return
    if builder.builder_config.source != "simulated":
        raise FileNotFoundError(
            f"dataset {dataset_name(species, dataset)} is not built in {data_dir}: build it "
            f"with `python -m experiments.build_data --species={species} --dataset={dataset} "
            f"--manual_dir=<your data> --data_dir={data_dir}`")
    build_once(lock_path(data_dir, "dataset", species, dataset), builder.is_prepared,
               builder.download_and_prepare,
               what=f"dataset {dataset_name(species, dataset)} in {data_dir}")


def catalog_for(species: Sequence[str], dataset: str, data_dir: str | os.PathLike,
                splits: Sequence[str] = (PHYSIOLOGICAL_SPLIT,)) -> Catalog:
    """A catalog over the given splits (those a species has) of several species' datasets."""
    refs = []
    for sp in species:
        ensure_dataset(sp, dataset, data_dir)
        available = tfds.builder(dataset_name(sp, dataset), data_dir=str(data_dir)).info.splits
        refs += [f"{dataset_name(sp, dataset)}:{s}" for s in splits if s in available]
    return Catalog(refs, data_dir)


def semantic_images(catalog: Catalog, species: str) -> list[Record]:
    """A species' physiological multi-organ images: what segmentation networks train on."""
    return catalog.filter(species=species, experiment="semantic",
                          perfusion_state=PHYSIOLOGICAL_SPLIT)


def nested_specs(catalog: Catalog, species: str, data_dir: str | os.PathLike, dataset: str
                 ) -> list[DataSpec]:
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


# -- projection banks ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BankRecipe:
    """Which images a bank is learnt from (method.md A2 table, in the simulated datasets)."""

    labels: tuple[str, ...]
    physiological: dict  # Catalog.filter criteria
    pathological: dict
    physiological_subjects: int = 0  # use only the first n subjects (0: all)


BANK_RECIPES = {
    # Kidney experiments: baseline phase vs renal clamping / stasis of the same animals.
    ("malperfusion", "pig"): BankRecipe(
        MALPERFUSED_LABELS, {"experiment": "kidney", "perfusion_state": "physiological"},
        {"experiment": "kidney", "perfusion_state": "malperfusion"}),
    ("malperfusion", "rat"): BankRecipe(
        MALPERFUSED_LABELS, {"experiment": "perfusion", "perfusion_state": "physiological"},
        {"experiment": "perfusion", "perfusion_state": "malperfusion"}),
    # ICG: physiological images of two semantic subjects vs the ICG experiment's images.
    ("ICG", "pig"): BankRecipe(
        ICG_LABELS, {"experiment": "semantic", "perfusion_state": "physiological"},
        {"experiment": "icg", "perfusion_state": "icg"}, physiological_subjects=2),
    ("ICG", "rat"): BankRecipe(
        ICG_LABELS, {"experiment": "semantic", "perfusion_state": "physiological"},
        {"experiment": "icg", "perfusion_state": "icg"}, physiological_subjects=2),
}


def bank_path(data_dir: str | os.PathLike, dataset: str, pathology: str, species: str) -> Path:
    """``<data_dir>/projections/<dataset>/weights+bias_<pathology>_<species>.h5``."""
    return Path(data_dir) / "projections" / dataset / f"weights+bias_{pathology}_{species}.h5"


def ensure_bank(pathology: str, species: str, dataset: str, data_dir: str | os.PathLike
                ) -> Path:
    """Learns the (pathology, species) bank unless it exists (once); returns its path."""
    path = bank_path(data_dir, dataset, pathology, species)
    if (pathology, species) not in BANK_RECIPES and not path.exists():
        raise ValueError(f"no recipe for {pathology} projections of {species}; known: "
                         f"{sorted(BANK_RECIPES)}")

    def learn():
        bank = learn_recipe_bank(pathology, species, dataset, data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        bank.save(path)

    build_once(lock_path(data_dir, "bank", pathology, species, dataset), path.exists, learn,
               what=f"{pathology} projections of {species} ({path})")
    return path


def learn_recipe_bank(pathology: str, species: str, dataset: str, data_dir: str | os.PathLike,
                      *, labels: Sequence[str] | None = None, **learn_kwargs) -> ProjectionBank:
    """Learns a bank from the images `BANK_RECIPES` names.

    Args:
      labels: the labels to learn maps for; None: the recipe's.
      **learn_kwargs: `learn_bank`'s fitting options (mode, steps, learning_rate, chunk_size).
    """
    recipe = BANK_RECIPES[pathology, species]
    splits = sorted({recipe.physiological["perfusion_state"],
                     recipe.pathological["perfusion_state"]})
    catalog = catalog_for([species], dataset, data_dir, splits)
    healthy = catalog.filter(species=species, **recipe.physiological)
    if recipe.physiological_subjects:
        keep = sorted({r.subject for r in healthy})[:recipe.physiological_subjects]
        healthy = [r for r in healthy if r.subject in keep]
    sick = catalog.filter(species=species, **recipe.pathological)
    logging.info("learning %s projections of %s from %d + %d images", pathology, species,
                 len(healthy), len(sick))
    return learn_bank(catalog, healthy, sick, recipe.labels if labels is None else labels,
                      source_species=species, state=pathology, **learn_kwargs)


def load_bank(config: ml_collections.ConfigDict) -> ProjectionBank | None:
    """The run's projection bank: ``config.augment.bank`` or the learnt default, or None."""
    if "projection" not in config.augment.steps:
        return None
    path = config.augment.bank
    if not path:
        path = ensure_bank(config.augment.pathology, config.augment.source, config.data.dataset,
                           data_dir_of(config))
    path = Path(os.path.expanduser(str(path)))
    if path.suffix == ".blosc":
        return ProjectionBank.from_htc(path, SPECIES_12)
    return ProjectionBank.load(path)


# -- training ------------------------------------------------------------------------------

def training_images(config: ml_collections.ConfigDict, catalog: Catalog
                    ) -> tuple[list[Record], list[Record]]:
    """Train and validation images of the run's fold (plus the joint model's extra species)."""
    specs = nested_specs(catalog, config.data.species, data_dir_of(config), config.data.dataset)
    if not 0 <= config.data.outer_fold < len(specs):
        raise ValueError(f"config.data.outer_fold={config.data.outer_fold}: expected 0.."
                         f"{len(specs) - 1}")
    spec = specs[config.data.outer_fold]
    if not 0 <= config.data.fold < len(spec.folds):
        raise ValueError(f"config.data.fold={config.data.fold}: expected 0..{len(spec.folds) - 1}")
    fold = spec.folds[config.data.fold]
    train_records = catalog.select(fold.train)
    for extra in config.data.extra_species:  # train_<species>-p in the reference's spec
        train_records += semantic_images(catalog, extra)
    return train_records, catalog.select(fold.validation_sets.get("val", []))


def train_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Trains (or resumes) one run; writes ``done.json`` when it has finished.

    Returns:
      The final train state.
    """
    workdir = Path(workdir)
    data_dir = data_dir_of(config)
    catalog = catalog_for([config.data.species, *config.data.extra_species],
                          config.data.dataset, data_dir)
    train_records, val_records = training_images(config, catalog)
    bank = load_bank(config)
    augment = build_pipeline(steps_from_config(config.augment))
    mesh = make_mesh(config.parallel.num_devices)
    iterator = train_iterator(catalog, train_records, batch_size=config.train.batch_size,
                              mesh=mesh, seed=config.train.seed,
                              domain="species" if config.data.extra_species else None,
                              num_threads=config.data.num_threads)

    def validate(step, predict):
        del step
        table = score_images(catalog, val_records, predict, config.evaluate.batch_size,
                             metrics=("dice",))
        return {"dice": float(np.nanmean(_class_means(table)))} if len(table) else {}

    state = train(config, str(workdir), train_iter=iterator, mesh=mesh, augment=augment,
                  augment_data=bank, val_fn=validate if val_records else None)
    if jax.process_index() == 0:
        with atomic_write(workdir / DONE_FILE, text=True) as f:
            json.dump({"configuration": config.configuration, "outer_fold": config.data.outer_fold,
                       "fold": config.data.fold, "train_images": len(train_records),
                       "step": int(jax.device_get(state.step))}, f)
    return state


def is_done(workdir: str | os.PathLike) -> bool:
    return (Path(workdir) / DONE_FILE).exists()


def restore_variables(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """The final model variables (SWA average if on) of a finished run, on the host."""
    return restore_final_variables(config, str(workdir))


# -- evaluation ----------------------------------------------------------------------------

def predictor(configs_and_variables: Sequence[tuple[ml_collections.ConfigDict, dict]]):
    """``predict(features) -> ensemble softmax`` averaging the models' probabilities."""
    models = [(build_model(c.model), v) for c, v in configs_and_variables]
    applies = [jax.jit(functools.partial(m.apply, train=False)) for m, _ in models]

    def predict(features):
        logits = [apply(v, features) for apply, (_, v) in zip(applies, models, strict=True)]
        return np.asarray(average_probabilities(np.stack(logits)))

    return predict


def score_images(catalog: Catalog, records: Sequence[Record], predict, batch_size: int, *,
                 metrics: Sequence[str] = ("dice", "nsd")) -> ScoreTable:
    """Per (image, label) scores of an ensemble on `records`, with each region's median StO2.

    NSD tolerances (pixels of 480 x 640 images) are scaled to the images' height; the median
    StO2 is the Tivita-style index (`xeno_jax.spectra.sto2`) over the region's pixels.
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
        index = np.asarray(sto2(batch["features"][:n]))
        medians = np.asarray(median_per_label(index, labels, valid, SPECIES_12.num_classes))
        tables.append(ScoreTable.from_images(
            [r.image_name for r in batch_records], [r.subject for r in batch_records],
            results["used_labels"], **{m: results[m] for m in metrics}, median_sto2=medians))
    if not tables:
        return ScoreTable(np.array([], str), np.array([], str), np.array([], int),
                          {m: np.array([]) for m in (*metrics, "median_sto2")})
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


def _class_means(table: ScoreTable, metric: str = "dice") -> np.ndarray:
    return class_level(table, metric).mean


def runs_root(workdir: str | os.PathLike, configuration: str, outer: int, fold: int) -> Path:
    return Path(workdir) / "runs" / configuration / f"outer_{outer}" / f"fold_{fold}"


def train_config_of(config: ml_collections.ConfigDict, outer: int, fold: int
                    ) -> ml_collections.ConfigDict:
    """A copy of a run config set to one (outer, inner) fold."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.data.outer_fold, copy.data.fold = outer, fold
    copy.lock()
    return copy

