"""Xeno-learning networks: the baseline plus projections learnt in another species (A3/A4).

Argument: ``<source>2<target>`` (malperfusion, kidney) or ``projected-ICG_<source>2<target>``,
then ``[,quick][,<dataset>]``, e.g.::

  python -m experiments.train --config=experiments/configs/xeno.py:pig2human --workdir=runs/x
  python -m experiments.train --config=experiments/configs/xeno.py:pig2human \
      --config.train.batch_size=16 --workdir=runs/x16
  python -m experiments.train --config=experiments/configs/xeno.py:projected-ICG_rat2pig,quick \
      --workdir=runs/icg
  python -m experiments.train --config=experiments/configs/xeno.py:pig2human \
      --config.augment.bank=banks/weights+bias_malperfusion_pig.h5 --workdir=runs/x

The projection bank is learnt from the source species' dataset (and stored next to it) unless
``config.augment.bank`` names a file (ours, or the reference's ``.blosc`` banks).
"""

from experiments.configs import run


def get_config(arg: str = "pig2human"):
    what, _, options = (arg or "").partition(",")
    name = what if what.startswith("projected-") else f"projected-malperfusion_{what}"
    return run.get_config(f"{name},{options}")
