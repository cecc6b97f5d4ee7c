"""Projection banks: which images each is learnt from, where it is stored, and the run's bank.

A bank is learnt once per (pathology, source species, dataset) and stored in
``<data_dir>/projections`` (method.md A2 says which images pair up); `ensure_bank` and
`ensure_run_bank` learn it when it is missing (once, under a file lock).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from xeno_jax.labels import ICG_LABELS, MALPERFUSED_LABELS, SPECIES_12
from xeno_jax.projections import ProjectionBank
from xeno_jax.projections.dataset import learn_bank
from xeno_jax.study.datasets import data_dir_of, ensure_catalog, lock_path
from xeno_jax.study.workdir import build_once


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
    catalog = ensure_catalog([species], dataset, data_dir, splits)
    healthy = catalog.filter(species=species, **recipe.physiological)
    if recipe.physiological_subjects:
        keep = sorted({r.subject for r in healthy})[:recipe.physiological_subjects]
        healthy = [r for r in healthy if r.subject in keep]
    sick = catalog.filter(species=species, **recipe.pathological)
    logging.info("learning %s projections of %s from %d + %d images", pathology, species,
                 len(healthy), len(sick))
    return learn_bank(catalog, healthy, sick, recipe.labels if labels is None else labels,
                      source_species=species, state=pathology, **learn_kwargs)


def ensure_run_bank(config: ml_collections.ConfigDict) -> ProjectionBank | None:
    """The run's projection bank: ``config.augment.bank``, or the default one (learnt once if
    missing, `ensure_bank`); None for a run without a projection step."""
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
