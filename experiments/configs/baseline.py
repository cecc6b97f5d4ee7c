"""Baseline segmentation networks: one species' physiological images, A4 baseline augmentation.

Argument: ``<species>[,quick][,<dataset>]``, e.g.::

  python -m experiments.train --config=experiments/configs/baseline.py:human --workdir=runs/bh
  python -m experiments.train --config=experiments/configs/baseline.py:pig,quick \
      --config.data.outer_fold=1 --config.data.fold=3 --workdir=runs/bp
  python -m experiments.train --config=experiments/configs/baseline.py:human,tivita \
      --config.data.data_dir=/data/tfds --workdir=runs/bh_real
"""

from experiments.configs import run


def get_config(arg: str = "human"):
    what, _, options = (arg or "").partition(",")
    return run.get_config(f"baseline_{what},{options}")
