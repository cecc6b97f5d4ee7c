"""Runs (or resumes) the xeno-learning study and writes <workdir>/report.md.

  python -m experiments.study --config=experiments/configs/study.py:demo --workdir=workdir
  python -m experiments.study --config=experiments/configs/study.py --workdir=study
  # four worker processes on this machine (each with config.launcher.gpus_per_run GPUs)
  python -m experiments.study --config=experiments/configs/study.py --workdir=study \
      --launcher=local --config.launcher.workers=4
  # a SLURM job array, one job per run (partition, GPUs, memory, time from the config)
  python -m experiments.study --config=experiments/configs/study.py --workdir=/shared/study \
      --launcher=submitit --config.launcher.partition=gpu --config.launcher.timeout_min=600
  # one command per missing run, for any other scheduler (LSF, PBS, Kubernetes, ...)
  python -m experiments.study --config=experiments/configs/study.py --workdir=/shared/study \
      --print_runs

Several study processes (or workers, or jobs) may share one work directory: each run is
trained once, by the worker that claims it; a run whose worker died is resumed by the next.
The study evaluates and reports when every run is done; started again, it trains only what is
missing. See experiments/configs/study.py for the configurations, folds and datasets.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from xeno_jax.study import launch
from xeno_jax.study.study import run_study

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the study.", required=True)
_LAUNCHER = flags.DEFINE_enum("launcher", "local", launch.LAUNCHERS,
                              "Where the training runs run (xeno_jax.study.launch).")
_PRINT_RUNS = flags.DEFINE_bool("print_runs", False,
                                "Print one shell command per missing run and exit.")
_RUN = flags.DEFINE_string("run", None, "Train only this run (<configuration>/outer_<i>/"
                           "fold_<k>); the last one to finish evaluates and reports.")


def main(argv):
    del argv
    config = common.resolve_study(_CONFIG.value, _WORKDIR.value)
    if _PRINT_RUNS.value:
        print("\n".join(launch.run_commands(sys.argv, config, _WORKDIR.value)))
        return
    common.start()
    report = run_study(config, _WORKDIR.value, launcher=_LAUNCHER.value, run=_RUN.value)
    logging.info("report: %s", report if report else "not yet, runs are missing")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
