"""Runs (or resumes) the divergence sweep and writes <workdir>/report.md.

  python -m experiments.sweep_divergence --workdir=sweep
  python -m experiments.sweep_divergence --workdir=sweep --config.divergences='(0.0,1.0)'

Each divergence is a study in <workdir>/divergence_<d> (its report next to it); the networks
that do not depend on the divergence train once, in <workdir>/runs. Started again, the sweep
trains and scores only what is missing. See experiments/configs/sweep_divergence.py and
xeno_jax/study/divergence.py.
"""

import logging
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from xeno_jax.study import launch
from xeno_jax.study.divergence import run_sweep

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).parent / "configs" / "sweep_divergence.py"),
    "Sweep config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the sweep.", required=True)
_LAUNCHER = flags.DEFINE_enum("launcher", "local", launch.LAUNCHERS,
                              "Where the training runs run (xeno_jax.study.launch).")
_REUSE_STALE = flags.DEFINE_bool(
    "reuse_stale", False, "Reuse finished runs and score tables made with a different config "
    "instead of refusing them.")


def main(argv):
    del argv
    config = _CONFIG.value
    with config.unlocked():  # one data directory for every point
        config.study = common.resolve_study(config.study, _WORKDIR.value)
    common.start()
    report = run_sweep(config, _WORKDIR.value, launcher=_LAUNCHER.value,
                       reuse_stale=_REUSE_STALE.value)
    logging.info("report: %s", report)


if __name__ == "__main__":
    app.run(main)
