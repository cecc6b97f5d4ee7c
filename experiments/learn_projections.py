"""Learns a source species' projection bank (see experiments/configs/learn_projections.py).

  python -m experiments.learn_projections \
      --config=experiments/configs/learn_projections.py:pig_malperfusion
"""

import logging
import os
from pathlib import Path

import numpy as np
from absl import app
from ml_collections import config_flags

from experiments import common
from xeno_jax.projections.dataset import learn_bank
from xeno_jax.study import runs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Projection config file.",
                                          lock_config=True)


def main(argv):
    del argv
    common.start()
    config = _CONFIG.value
    data_dir = Path(os.path.expanduser(config.data_dir))
    recipe = runs.BANK_RECIPES[config.pathology, config.species]
    catalog = runs.catalog_for([config.species], config.dataset, data_dir,
                               sorted({recipe.physiological["perfusion_state"],
                                       recipe.pathological["perfusion_state"]}))
    healthy = catalog.filter(species=config.species, **recipe.physiological)
    if recipe.physiological_subjects:
        keep = sorted({r.subject for r in healthy})[:recipe.physiological_subjects]
        healthy = [r for r in healthy if r.subject in keep]
    sick = catalog.filter(species=config.species, **recipe.pathological)
    bank = learn_bank(catalog, healthy, sick, config.labels, mode=config.mode, steps=config.steps,
                      learning_rate=config.learning_rate, chunk_size=config.chunk_size,
                      source_species=config.species, state=config.pathology)
    output = Path(config.output) if config.output else runs.bank_path(
        data_dir, config.dataset, config.pathology, config.species).with_name(
        f"{config.mode}_{config.pathology}_{config.species}.h5")
    output.parent.mkdir(parents=True, exist_ok=True)
    bank.save(output)
    for name, start, count in zip(bank.label_names, bank.offsets, bank.counts, strict=True):
        losses = bank.losses[start:start + count]
        logging.info("%s: %d pairs, final loss percentiles 5/50/95: %s", name, losses.size,
                     np.percentile(losses, [5, 50, 95]))
    logging.info("wrote %s", output)


if __name__ == "__main__":
    app.run(main)
