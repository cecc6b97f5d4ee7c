"""TFDS dataset folders, one per species (``tfds build data_builders/<species>``).

`builder` returns the TFDS builder of a species by name, for code that builds or reads the
datasets without the TFDS command line. Builds run locally, or on Apache Beam (the ``beam``
extra) when TFDS's download config names a Beam runner or options (`beam_options`).
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


BEAM_EXTRA = "pip install 'xeno_jax[beam]'  (from a checkout: pip install -e '.[beam]')"


def import_beam():
    """The ``apache_beam`` module, or an ImportError naming the extra that installs it."""
    try:
        import apache_beam  # the optional `beam` extra
    except ImportError as e:
        raise ImportError(f"a Beam build needs Apache Beam, the `beam` extra: {BEAM_EXTRA} "
                          f"({e})") from None
    return apache_beam


def beam_options(text: str):
    """``--beam_pipeline_options`` text (TFDS's: ``runner=DirectRunner,direct_num_workers=2``)
    -> Beam's ``PipelineOptions``."""
    beam = import_beam()
    return beam.options.pipeline_options.PipelineOptions(
        flags=[f"--{option}" for option in text.split(",") if option])
