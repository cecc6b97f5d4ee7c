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
from xeno_jax.study import banks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Projection config file.",
                                          lock_config=True)


def main(argv):
    del argv
    common.start()
    config = _CONFIG.value
    data_dir = Path(os.path.expanduser(config.data_dir))
    bank = banks.learn_recipe_bank(config.pathology, config.species, config.dataset, data_dir,
                                   labels=config.labels, mode=config.mode, steps=config.steps,
                                   learning_rate=config.learning_rate,
                                   chunk_size=config.chunk_size)
    output = Path(config.output) if config.output else banks.bank_path(
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
