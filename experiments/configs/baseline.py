"""Baseline segmentation networks: one species' physiological images, A4 baseline augmentation.

Argument: ``<species>[,quick][,<dataset>]``, e.g.::

  python -m experiments.train --config=experiments/configs/baseline.py:human --workdir=runs/bh
  python -m experiments.train --config=experiments/configs/baseline.py:pig,quick \
      --config.data.outer_fold=1 --config.data.fold=3 --workdir=runs/bp
  python -m experiments.train --config=experiments/configs/baseline.py:human,tivita \
      --config.data.data_dir=/data/tfds --workdir=runs/bh_real
"""

from xeno_jax.study.configurations import config_from_arg


def get_config(arg: str = "human"):
    return config_from_arg(arg, "baseline")
