"""Projection banks: which images each is learnt from, where it is stored, and the run's bank.

A bank is learnt once per (pathology, source species, dataset) and stored in
``<data_dir>/projections`` (method.md A2 says which images pair up); `ensure_bank` and
`ensure_run_bank` learn it when it is missing (once, under a file lock).

Banks learn on a fixed projection split: the first third of the subjects of the pathological
images (the reference learns its pig malperfusion maps on 4 of 12 pigs), with the
physiological images of the same animals or of a few other subjects (`BankRecipe`). Those
subjects are held out of every test set of their species (`held_out_subjects`), so no network is
scored on an animal whose spectra made its maps, whichever configurations a study has.

The controls of a transfer come from the same images: `random_maps` (random maps of the learnt
maps' sizes) and `ensure_rule_threshold` (the StO2 threshold of the rule baseline).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from xeno_jax.data import Catalog, Record, evaluation_batches
from xeno_jax.io import atomic_write
from xeno_jax.labels import ICG_LABELS, MALPERFUSED_LABELS, SPECIES_12
from xeno_jax.projections import ProjectionBank
from xeno_jax.projections.dataset import learn_bank
from xeno_jax.spectra import sto2
from xeno_jax.study.datasets import data_dir_of, ensure_catalog, lock_path
from xeno_jax.study.workdir import build_once

PROJECTION_SHARE = 1 / 3
"""Share of a pathological set's subjects (the first, rounded up) that maps are learnt on."""
RANDOM_MAPS_SEED = 0


@dataclasses.dataclass(frozen=True)
class BankRecipe:
    """Which images a bank is learnt from (method.md A2 table, in the simulated datasets)."""

    labels: tuple[str, ...]
    physiological: dict  # Catalog.filter criteria
    pathological: dict
    # 0: the physiological images of the pathological images' own subjects (the same
    # experiment); n: those of the first n subjects whose images show one of the labels.
    physiological_subjects: int = 0


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
    # The oracle of the human transfers (simulation only: the paper has no such pairs):
    # physiological kidneys of four patients vs the malperfused kidneys of transplantation.
    ("malperfusion", "human"): BankRecipe(
        MALPERFUSED_LABELS, {"experiment": "semantic", "perfusion_state": "physiological"},
        {"experiment": "kidney_transplant", "perfusion_state": "malperfusion"},
        physiological_subjects=4),
}


def recipe_images(recipe: BankRecipe, catalog: Catalog, species: str
                  ) -> tuple[list[Record], list[Record]]:
    """The (physiological, pathological) images a recipe learns from: the projection split."""
    pathological = catalog.filter(species=species, **recipe.pathological)
    subjects = sorted({r.subject for r in pathological})
    split = set(subjects[:math.ceil(len(subjects) * PROJECTION_SHARE)])
    physiological = catalog.filter(species=species, **recipe.physiological)
    if recipe.physiological_subjects:
        labels = {SPECIES_12.name_to_index(n) for n in recipe.labels}
        showing = sorted({r.subject for r in physiological if labels & set(r.labels)})
        keep = set(showing[:recipe.physiological_subjects])
    else:
        keep = split
    return ([r for r in physiological if r.subject in keep],
            [r for r in pathological if r.subject in split])


def held_out_subjects(catalog: Catalog, species: str) -> set[str]:
    """Subjects any bank of `species` learns from (`recipe_images`); no test set scores them."""
    subjects = set()
    for (_, of), recipe in BANK_RECIPES.items():
        if of == species:
            for images in recipe_images(recipe, catalog, species):
                subjects |= {r.subject for r in images}
    return subjects


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
    catalog = recipe_catalog(recipe, species, dataset, data_dir)
    healthy, sick = recipe_images(recipe, catalog, species)
    logging.info("learning %s projections of %s from %d + %d images", pathology, species,
                 len(healthy), len(sick))
    return learn_bank(catalog, healthy, sick, recipe.labels if labels is None else labels,
                      source_species=species, state=pathology, **learn_kwargs)


def recipe_catalog(recipe: BankRecipe, species: str, dataset: str,
                   data_dir: str | os.PathLike) -> Catalog:
    splits = sorted({recipe.physiological["perfusion_state"],
                     recipe.pathological["perfusion_state"]})
    return ensure_catalog([species], dataset, data_dir, splits)


def random_maps(bank: ProjectionBank, seed: int = RANDOM_MAPS_SEED) -> ProjectionBank:
    """The random control of a bank: every map replaced by a random one of the same size.

    Map k becomes ``W = I + ||W_k - I|| G / ||G||`` and ``b = ||b_k|| g / ||g||`` (Frobenius
    and Euclidean norms; G and g standard normal), so each label keeps exactly its
    distribution of ||W - I|| and ||b|| while the directions are random.
    """
    rng = np.random.default_rng(seed)
    weights, biases = np.asarray(bank.weights, np.float64), np.asarray(bank.biases, np.float64)
    eye = np.eye(bank.num_channels)
    g_w = rng.standard_normal(weights.shape)
    g_b = rng.standard_normal(biases.shape)
    w_norm = np.linalg.norm(weights - eye, axis=(1, 2), keepdims=True)
    b_norm = np.linalg.norm(biases, axis=1, keepdims=True)
    random_w = eye + w_norm * g_w / np.linalg.norm(g_w, axis=(1, 2), keepdims=True)
    random_b = b_norm * g_b / np.linalg.norm(g_b, axis=1, keepdims=True)
    return dataclasses.replace(bank, weights=random_w.astype(np.float32),
                               biases=random_b.astype(np.float32),
                               losses=np.full(len(weights), np.nan, np.float32),
                               state=f"random-{bank.state}")


def rule_threshold_path(data_dir: str | os.PathLike, dataset: str, pathology: str,
                        species: str) -> Path:
    return Path(data_dir) / "projections" / dataset / f"rule_{pathology}_{species}.json"


def rule_threshold(pathology: str, species: str, dataset: str, data_dir: str | os.PathLike
                   ) -> dict:
    """The rule baseline's StO2 threshold from one species' bank images (its projection split).

    The threshold maximises Youden's J (true-positive minus false-positive rate of "index <
    threshold") between the pathological organ's pixels in the pathological images and every
    annotated pixel of the physiological images, with the open StO2 index
    (`xeno_jax.spectra.sto2`). Only this species' images are read.
    """
    recipe = BANK_RECIPES[pathology, species]
    if len(recipe.labels) != 1:
        raise ValueError(f"the rule relabels pixels as one organ; {pathology} acts on "
                         f"{recipe.labels}")
    catalog = recipe_catalog(recipe, species, dataset, data_dir)
    healthy, sick = recipe_images(recipe, catalog, species)
    organ = SPECIES_12.name_to_index(recipe.labels[0])

    def indices(records, select):
        values = []
        for _, batch in evaluation_batches(catalog, records, 8):
            index = np.asarray(sto2(batch["features"]))
            values.append(index[select(batch)])
        return np.concatenate(values) if values else np.array([])

    positives = indices(sick, lambda b: b["valid"] & (b["labels"] == organ))
    negatives = indices(healthy, lambda b: b["valid"])
    if not positives.size or not negatives.size:
        raise ValueError(f"no {recipe.labels[0]} pixels in the {pathology} images of {species} "
                         f"({len(sick)} images) or no physiological pixels ({len(healthy)} "
                         "images) to take the rule's threshold from")
    candidates = np.unique(np.quantile(np.concatenate([positives, negatives]),
                                       np.linspace(0, 1, 1001)))
    positives, negatives = np.sort(positives), np.sort(negatives)
    tpr = np.searchsorted(positives, candidates, side="left") / positives.size
    fpr = np.searchsorted(negatives, candidates, side="left") / negatives.size
    best = int(np.argmax(tpr - fpr))
    return {"threshold": float(candidates[best]), "true_positive_rate": float(tpr[best]),
            "false_positive_rate": float(fpr[best]), "species": species,
            "pathology": pathology, "organ": recipe.labels[0],
            "images": [r.image_name for r in (*healthy, *sick)]}


def ensure_rule_threshold(pathology: str, species: str, dataset: str,
                          data_dir: str | os.PathLike) -> dict:
    """`rule_threshold`, computed once and stored next to the banks."""
    path = rule_threshold_path(data_dir, dataset, pathology, species)

    def compute():
        record = rule_threshold(pathology, species, dataset, data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, text=True) as f:
            json.dump(record, f, indent=1)

    build_once(lock_path(data_dir, "rule", pathology, species, dataset), path.exists, compute,
               what=f"the rule's {pathology} threshold of {species} ({path})")
    return json.loads(path.read_text(encoding="utf-8"))


def ensure_run_bank(config: ml_collections.ConfigDict) -> ProjectionBank | None:
    """The run's projection bank: ``config.augment.bank``, or the default one (learnt once if
    missing, `ensure_bank`); its `random_maps` if ``config.augment.maps`` is "random"; None for
    a run without a projection step."""
    if "projection" not in config.augment.steps:
        return None
    path = config.augment.bank
    if not path:
        path = ensure_bank(config.augment.pathology, config.augment.source, config.data.dataset,
                           data_dir_of(config))
    path = Path(os.path.expanduser(str(path)))
    bank = (ProjectionBank.from_htc(path, SPECIES_12) if path.suffix == ".blosc" else
            ProjectionBank.load(path))
    maps = config.augment.get("maps", "learned")
    if maps not in ("learned", "random"):
        raise ValueError(f"config.augment.maps={maps!r}: expected 'learned' or 'random'")
    if maps == "random":
        bank = random_maps(bank)
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
