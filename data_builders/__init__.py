"""TFDS dataset folders, one per species (``tfds build data_builders/<species>``).

`builder` returns the TFDS builder of a species by name, for code that builds or reads the
datasets without the TFDS command line.
"""

from __future__ import annotations

import importlib

import tensorflow_datasets as tfds

SPECIES = ("human", "pig", "rat")


def builder_class(species: str) -> type[tfds.core.GeneratorBasedBuilder]:
    """The ``Builder`` of ``data_builders/<species>``."""
    try:
        module = importlib.import_module(f"data_builders.{species}.{species}_dataset_builder")
    except ModuleNotFoundError:
        raise ValueError(
            f"no dataset builder for species {species!r}: expected "
            f"data_builders/{species}/{species}_dataset_builder.py; built in: {SPECIES}"
        ) from None
    return module.Builder


def builder(species: str, config: str = "sim_small", **kwargs) -> tfds.core.DatasetBuilder:
    """A species builder writing ArrayRecord files (kwargs go to the TFDS builder)."""
    return builder_class(species)(config=config, file_format="array_record", **kwargs)
