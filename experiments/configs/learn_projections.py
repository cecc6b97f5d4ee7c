"""Projection learning in a source species (method.md A2).

Argument: ``<species>_<pathology>[,<dataset>]`` with pathology ``malperfusion`` or ``ICG``::

  python -m experiments.learn_projections \
      --config=experiments/configs/learn_projections.py:pig_malperfusion
  python -m experiments.learn_projections \
      --config=experiments/configs/learn_projections.py:rat_ICG,sim_full \
      --config.data_dir=/data/tfds --config.output=banks/rat_icg.h5
"""

import ml_collections

from xeno_jax.study.banks import BANK_RECIPES


def get_config(arg: str = "pig_malperfusion") -> ml_collections.ConfigDict:
    what, _, dataset = (arg or "pig_malperfusion").partition(",")
    species, _, pathology = what.partition("_")
    if (pathology, species) not in BANK_RECIPES:
        raise ValueError(f"no projection recipe for {arg!r}; known: "
                         f"{[f'{s}_{p}' for p, s in BANK_RECIPES]}")
    config = ml_collections.ConfigDict()
    config.species = species
    config.pathology = pathology
    config.dataset = dataset or "sim_small"
    config.data_dir = "~/tensorflow_datasets"
    config.labels = BANK_RECIPES[pathology, species].labels  # organs to learn maps for
    config.mode = "weights+bias"  # weights | bias | weights+bias
    config.steps = 100
    config.learning_rate = 0.01
    config.chunk_size = 64  # pairs fitted together (bounds memory)
    # Output file; "": <data_dir>/projections/<dataset>/<mode>_<pathology>_<species>.h5
    config.output = ""
    config.lock()
    return config
