"""Nested cross-validation by subject, and data specs in the reference's JSON format.

The reference (htc ``SpecsGeneration``, method.md A8) splits subjects into 3 outer folds with
``MultilabelStratifiedKFold`` (iterative-stratification) on a per-subject vector of which of the
12 classes occur; each outer fold's remaining subjects are split again into 5 inner folds
(train/val). Every outer fold is one data spec: a list of folds ``fold_0 .. fold_4``, each with
``train``, ``val`` and ``test`` (the same test set in all five).

A data spec file is JSON: ``[{"fold_name": "fold_0", "train": {"image_names": [...]},
"val": {...}, "test": {...}}, ...]``. Split names must start with ``train``, ``val`` or ``test``;
all ``train*`` splits are trained on together (e.g. ``train_pig-p`` adds physiological pig
images for the joint model), each ``val*`` split is its own validation set, and all ``test*``
splits form the test set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from xeno_jax.data.catalog import Record
from xeno_jax.io import atomic_write
from xeno_jax.labels import SPECIES_12

_SPLIT_NAME = re.compile(r"^(train|val|test)")


@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold: split name -> image names."""

    name: str
    splits: Mapping[str, tuple[str, ...]]

    def _merged(self, prefix: str) -> list[str]:
        return sorted({n for key, names in self.splits.items() if key.startswith(prefix)
                       for n in names})

    @property
    def train(self) -> list[str]:
        """All ``train*`` images."""
        return self._merged("train")

    @property
    def test(self) -> list[str]:
        """All ``test*`` images."""
        return self._merged("test")

    @property
    def validation_sets(self) -> dict[str, list[str]]:
        """Each ``val*`` split on its own."""
        return {k: list(v) for k, v in self.splits.items() if k.startswith("val")}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The folds of one (outer) cross-validation split."""

    folds: tuple[Fold, ...]

    def fold(self, name: str) -> Fold:
        for fold in self.folds:
            if fold.name == name:
                return fold
        raise KeyError(f"no fold {name!r}; folds: {[f.name for f in self.folds]}")

    def to_json(self) -> list[dict]:
        return [{"fold_name": f.name, **{k: {"image_names": list(v)} for k, v in f.splits.items()}}
                for f in self.folds]

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path, text=True) as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DataSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list) or not data:
            raise ValueError(f"{path}: expected a non-empty list of folds")
        folds = []
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("fold_name"), str):
                raise ValueError(f"{path}: fold {i} lacks a string 'fold_name'")
            splits = {}
            for key, value in entry.items():
                if key == "fold_name":
                    continue
                if not _SPLIT_NAME.match(key):
                    raise ValueError(f"{path}: fold {entry['fold_name']}: split {key!r} must "
                                     "start with train, val or test")
                names = value.get("image_names") if isinstance(value, dict) else None
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError(f"{path}: fold {entry['fold_name']}, split {key}: expected "
                                     "{'image_names': [str, ...]}")
                splits[key] = tuple(names)
            if not any(k.startswith("train") for k in splits):
                raise ValueError(f"{path}: fold {entry['fold_name']} has no train split")
            folds.append(Fold(entry["fold_name"], splits))
        return cls(tuple(folds))


def subject_label_matrix(records: Sequence[Record], num_classes: int = SPECIES_12.num_classes
                         ) -> tuple[list[str], np.ndarray]:
    """Sorted subjects and a bool matrix (subjects, classes): does any image show the class."""
    subjects = sorted({r.subject for r in records})
    row = {s: i for i, s in enumerate(subjects)}
    present = np.zeros((len(subjects), num_classes), bool)
    for record in records:
        present[row[record.subject], list(record.labels)] = True
    return subjects, present


def _stratified_folds(present: np.ndarray, n_splits: int, seed: int):
    if len(present) < n_splits:
        raise ValueError(f"{len(present)} subjects cannot be split into {n_splits} folds")
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(present), 1)), present.astype(int)))


def nested_cross_validation(records: Sequence[Record], *, outer_folds: int = 3,
                            inner_folds: int = 5, seed: int = 0) -> list[DataSpec]:
    """Nested cross-validation by subject, multilabel-stratified on the classes per subject.

    Args:
      records: the images to split (e.g. one species' physiological semantic images).
      outer_folds: number of outer folds (data specs); each subject is tested in exactly one.
      inner_folds: train/val folds within each outer fold.
      seed: seeds both stratified splitters (same seed, same folds).

    Returns:
      One `DataSpec` per outer fold, with folds ``fold_0 ..`` holding train, val and test.
    """
    subjects, present = subject_label_matrix(records)
    images = {s: sorted(r.image_name for r in records if r.subject == s) for s in subjects}
    names_of = lambda subject_indices: tuple(n for i in sorted(subject_indices)
                                             for n in images[subjects[i]])
    specs = []
    for rest, test in _stratified_folds(present, outer_folds, seed):
        folds = []
        for k, (train, val) in enumerate(_stratified_folds(present[rest], inner_folds, seed)):
            folds.append(Fold(f"fold_{k}", {"train": names_of(rest[train]),
                                            "val": names_of(rest[val]),
                                            "test": names_of(test)}))
        specs.append(DataSpec(tuple(folds)))
    return specs


def spec_name(species: str, outer: int, *, outer_folds: int = 3, inner_folds: int = 5,
              seed: int = 0) -> str:
    """The reference's spec file name, e.g. ``pig_semantic-only_5folds_nested-0-2_...json``."""
    return (f"{species}_semantic-only_{inner_folds}folds_nested-{outer}-{outer_folds - 1}"
            f"_mapping-12_seed-{seed}.json")
