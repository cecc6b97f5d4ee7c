"""Trains one network of a configuration (see the docstrings of experiments/configs/*.py).

  python -m experiments.train --config=experiments/configs/xeno.py:pig2human --workdir=runs/x
  python -m experiments.train --config=experiments/configs/baseline.py:human,quick \
      --config.train.batch_size=16 --workdir=runs/b
  python -m experiments.train --config=... --workdir=... --distributed   # one per host

A run resumes from the latest checkpoint in --workdir. Missing simulated datasets are built,
missing projection banks learnt.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from xeno_jax.study import runs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the run.", required=True)


def main(argv):
    del argv
    common.start()
    runs.train_run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
