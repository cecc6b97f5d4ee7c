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
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
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
    class_level,
    evaluate_images,
    nsd_tolerances,
)
from xeno_jax.evaluate.perfusion import median_per_label
from xeno_jax.io import atomic_write
from xeno_jax.io.lock import workdir_lock
from xeno_jax.labels import ICG_LABELS, MALPERFUSED_LABELS, SPECIES_12
from xeno_jax.models import build_model, convert, load_pretrained
from xeno_jax.projections import ProjectionBank
from xeno_jax.projections.dataset import learn_bank
from xeno_jax.spectra import sto2, tivita_wavelengths
from xeno_jax.study.workdir import build_once
from xeno_jax.train import fingerprint, train
from xeno_jax.train.loop import restore_final_variables
from xeno_jax.train.parallel import make_mesh
from xeno_jax.train.predict import predictor as data_parallel_predictor

REFERENCE_HEIGHT = 480  # NSD tolerances are in pixels of 480 x 640 images
DONE_FILE = "done.json"
STO2_COLUMNS = ("median_sto2", "vendor_sto2")
"""Score-table columns that describe a region's StO2, not a score."""
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
                splits: Sequence[str] | None = (PHYSIOLOGICAL_SPLIT,)) -> Catalog:
    """A catalog over the given splits (those a species has; None: all) of several species'
    datasets."""
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


def outer_spec(catalog: Catalog, species: str, outer: int, data_dir: str | os.PathLike,
               dataset: str, spec: str = "") -> DataSpec:
    """The data spec of one outer fold.

    Args:
      spec: ``""``: our nested cross-validation (`nested_specs`); a folder: the reference's
        spec file of the species and outer fold in it (`spec_name`, e.g. the paper's
        ``pig_semantic-only_5folds_nested-0-2_mapping-12_seed-0.json``); a file: that spec.
    """
    if spec:
        path = Path(os.path.expanduser(spec))
        return DataSpec.load(path / spec_name(species, outer) if path.is_dir() else path)
    specs = nested_specs(catalog, species, data_dir, dataset)
    if not 0 <= outer < len(specs):
        raise ValueError(f"outer fold {outer}: expected 0..{len(specs) - 1}")
    return specs[outer]


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
    bank = (ProjectionBank.from_htc(path, SPECIES_12) if path.suffix == ".blosc" else
            ProjectionBank.load(path))
    check_bank_reaches_targets(bank, config.augment.projection.target_labels, path)
    return bank


def check_bank_reaches_targets(bank: ProjectionBank, target_labels: Sequence[str],
                               path: str | os.PathLike) -> None:
    """A projected run must be able to change pixels: some target label needs matrices.

    Raises:
      ValueError: naming the bank, its labels and the targets, if no target label has
        matrices (the run would silently train a baseline network); targets without matrices
        next to ones with are logged as a warning.
    """
    if not target_labels:  # () projects every label of the bank
        return
    targets = {SPECIES_12.name_to_index(name): name for name in target_labels}
    unknown = [name for index, name in targets.items() if not SPECIES_12.is_valid(index)]
    if unknown:
        raise ValueError(f"config.augment.projection.target_labels: {unknown} are not labels "
                         f"of the 12-class mapping; known: {sorted(SPECIES_12.mapping)}")
    has = dict(zip(bank.label_indices, bank.label_names, strict=True))
    reached = sorted(set(targets) & set(has))
    if not reached:
        raise ValueError(
            f"{path}: the bank has matrices for the labels {has} but config.augment.projection."
            f"target_labels={tuple(target_labels)} (indices {sorted(targets)}): its projections "
            "would change no pixel and the network would be a baseline. Use a bank learnt for "
            "the target labels or change config.augment.projection.target_labels")
    missing = [name for index, name in targets.items() if index not in has]
    if missing:
        logging.warning("%s: no matrices for the target labels %s; only %s are projected", path,
                        missing, [targets[i] for i in reached])


# -- training ------------------------------------------------------------------------------

def training_images(config: ml_collections.ConfigDict, catalog: Catalog
                    ) -> tuple[list[Record], list[Record]]:
    """Train and validation images of the run's fold (plus the joint model's extra species)."""
    spec = outer_spec(catalog, config.data.species, config.data.outer_fold, data_dir_of(config),
                      config.data.dataset, config.data.get("spec", ""))
    if not 0 <= config.data.fold < len(spec.folds):
        raise ValueError(f"config.data.fold={config.data.fold}: expected 0..{len(spec.folds) - 1}")
    fold = spec.folds[config.data.fold]
    train_records = catalog.select(fold.train)
    for extra in config.data.extra_species:  # train_<species>-p in the reference's spec
        train_records += semantic_images(catalog, extra)
    # The reference makes each val* split its own validation set; the first is the one we use.
    validation = next(iter(fold.validation_sets.values()), [])
    return train_records, catalog.select(validation)


def run_fingerprint(config: ml_collections.ConfigDict) -> fingerprint.Fingerprint:
    """What a run's result depends on: its config and its projection bank."""
    return fingerprint.of_run(config, load_bank(config))


def train_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              reuse_stale: bool = False):
    """Trains (or resumes) one run; writes ``done.json`` when it has finished.

    The work directory is locked while the run writes it (`xeno_jax.io.lock`); a finished run
    or checkpoint made with another config (`xeno_jax.train.fingerprint`) is refused unless
    `reuse_stale`.

    Returns:
      The final train state.

    Raises:
      WorkdirBusyError: if another process works in `workdir`.
      StaleWorkError: naming the keys that differ, for work made with another config.
    """
    with workdir_lock(workdir, f"training {config.configuration}",
                      enabled=jax.process_index() == 0):
        return _train_run(config, Path(workdir), reuse_stale)


def _train_run(config: ml_collections.ConfigDict, workdir: Path, reuse_stale: bool):
    data_dir = data_dir_of(config)
    bank = load_bank(config)
    record = fingerprint.of_run(config, bank)
    if is_done(workdir):
        fingerprint.check(record, read_done(workdir).get("fingerprint"),
                          what=f"the finished run {workdir}", reuse_stale=reuse_stale)
    catalog = catalog_for([config.data.species, *config.data.extra_species],
                          config.data.dataset, data_dir)
    train_records, val_records = training_images(config, catalog)
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
                  augment_data=bank, val_fn=validate if val_records else None,
                  reuse_stale=reuse_stale)
    if jax.process_index() == 0:
        with atomic_write(workdir / DONE_FILE, text=True) as f:
            json.dump({"configuration": config.configuration,
                       "outer_fold": config.data.outer_fold, "fold": config.data.fold,
                       "train_images": len(train_records),
                       "step": int(jax.device_get(state.step)),
                       "fingerprint": record.to_json()}, f)
    return state


def is_done(workdir: str | os.PathLike) -> bool:
    """A finished run, or a converted network put in the run's place (never trained over)."""
    return (Path(workdir) / DONE_FILE).exists() or convert.is_pretrained(workdir)


def read_done(workdir: str | os.PathLike) -> dict:
    """The ``done.json`` record of a finished run.

    Raises:
      ValueError: naming the file, if it is not a JSON object.
    """
    path = Path(workdir) / DONE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to train the run again"
                         ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def finished(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
             reuse_stale: bool = False) -> bool:
    """Whether the run in `workdir` has finished with this config's fingerprint.

    Raises:
      StaleWorkError: if it finished with another config (unless `reuse_stale`).
    """
    if not is_done(workdir):
        return False
    fingerprint.check(run_fingerprint(config), read_done(workdir).get("fingerprint"),
                      what=f"the finished run {workdir}", reuse_stale=reuse_stale)
    return True


def restore_variables(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """The final model variables (SWA average if on) of a finished run, on the host.

    A converted network (`experiments.convert_weights --output=<workdir>`) must match
    ``config.model``.
    """
    if convert.is_pretrained(workdir):
        return load_pretrained(str(workdir), like=config.model)[1]
    return restore_final_variables(config, str(workdir))


# -- evaluation ----------------------------------------------------------------------------

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
        tables.append(ScoreTable.from_images(
            [r.image_name for r in batch_records], [r.subject for r in batch_records],
            results["used_labels"], **{m: results[m] for m in metrics}, median_sto2=medians,
            vendor_sto2=np.broadcast_to(has_vendor[:, None], medians.shape).astype(float)))
    if not tables:
        return ScoreTable(np.array([], str), np.array([], str), np.array([], int),
                          {m: np.array([]) for m in (*metrics, *STO2_COLUMNS)})
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

