"""Learning a `ProjectionBank` from dataset images (method.md A2).

For every label, every physiological image that shows the label is paired with every
pathological image that shows it (a Cartesian product, not matched by subject), and one affine
map is fitted per pair from the L1-normalised spectra of all pixels annotated with the label.
Each image is read once; its pixels of every label are taken from that one read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import tqdm

from xeno_jax.data.catalog import Catalog, Record
from xeno_jax.labels import SPECIES_12
from xeno_jax.projections.bank import ProjectionBank
from xeno_jax.projections.learn import fit_projections
from xeno_jax.spectra import l1_normalize

MIN_PIXELS = 2  # the unbiased standard deviation needs two pixels


def label_spectra(catalog: Catalog, records: Sequence[Record], labels: Sequence[int]
                  ) -> dict[int, dict[str, np.ndarray]]:
    """``{label: {image_name: (n, C) L1 spectra}}`` of every image showing the label."""
    spectra: dict[int, dict[str, np.ndarray]] = {label: {} for label in labels}
    for record in tqdm.tqdm(records, desc="reading spectra", unit="image", leave=False):
        wanted = [label for label in labels if label in record.labels]
        if not wanted:
            continue
        example = catalog.read(record)
        cube, annotation = example["cube"], np.asarray(example["labels"])
        for label in wanted:
            mask = annotation == label
            if mask.sum() >= MIN_PIXELS:
                spectra[label][record.image_name] = l1_normalize(cube[mask].astype(np.float32))
    return spectra


def learn_bank(catalog: Catalog, physiological: Sequence[Record],
               pathological: Sequence[Record], labels: Sequence[str], *,
               mode: str = "weights+bias", steps: int = 100, learning_rate: float = 0.01,
               chunk_size: int = 64, source_species: str = "", state: str = "") -> ProjectionBank:
    """Fits the projections of all (physiological, pathological) pairs of every label.

    Args:
      catalog: where the images are read from.
      physiological, pathological: the two image sets of the source species.
      labels: label names of `SPECIES_12` to learn maps for; labels no pair of images shows
        are skipped (with a warning).
      mode, steps, learning_rate, chunk_size: as for `fit_projections`.
      source_species, state: provenance stored in the bank.

    Returns:
      The bank, with pair names and per-pair losses.
    """
    indices = {}
    for name in labels:
        index = SPECIES_12.name_to_index(name)
        if not SPECIES_12.is_valid(index):
            raise ValueError(f"label {name!r} is not a class of SPECIES_12")
        indices[index] = name
    healthy = label_spectra(catalog, physiological, list(indices))
    sick = label_spectra(catalog, pathological, list(indices))
    pairs, losses, names = {}, {}, {}
    for index, name in indices.items():
        if not healthy[index] or not sick[index]:
            logging.warning("no %s pairs for %r (%d physiological, %d pathological images)",
                            state, name, len(healthy[index]), len(sick[index]))
            continue
        logging.info("fitting %d x %d %s pairs for %r", len(healthy[index]), len(sick[index]),
                     state, name)
        weights, biases, loss = fit_projections(
            list(healthy[index].values()), list(sick[index].values()), mode=mode, steps=steps,
            learning_rate=learning_rate, chunk_size=chunk_size)
        pairs[index] = (np.asarray(weights), np.asarray(biases))
        losses[index] = np.asarray(loss)
        names[index] = [(a, b) for a in healthy[index] for b in sick[index]]
    if not pairs:
        raise ValueError(f"none of the labels {list(labels)} is shown by both image sets")
    return ProjectionBank.from_pairs(pairs, losses=losses, pair_names=names,
                                     label_names=indices, source_species=source_species,
                                     state=state)
