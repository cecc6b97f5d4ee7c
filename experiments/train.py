"""Trains one network of a configuration (see the docstrings of experiments/configs/*.py).

  python -m experiments.train --config=experiments/configs/xeno.py:pig2human --workdir=runs/x
  python -m experiments.train --config=experiments/configs/baseline.py:human,quick \
      --config.train.batch_size=16 --workdir=runs/b
  python -m experiments.train --config=... --workdir=... --distributed   # one per host

A run resumes from the newest intact checkpoint in --workdir, if that was made with the same
config (everything that changes the result; see xeno_jax/train/fingerprint.py): another config
is refused, naming the keys that differ, unless --reuse_stale. The work directory is locked
while the run writes it. Missing simulated datasets are built, missing projection banks learnt.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from xeno_jax.study import runs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the run.", required=True)
_REUSE_STALE = flags.DEFINE_bool(
    "reuse_stale", False, "Resume from checkpoints made with a different config instead of "
    "refusing them.")


def main(argv):
    del argv
    common.start()
    runs.train_run(_CONFIG.value, _WORKDIR.value, reuse_stale=_REUSE_STALE.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
