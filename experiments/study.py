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
  # every point of the config file's sweep(), each a study in <workdir>/<point>
  python -m experiments.study --config=experiments/configs/study.py:demo --workdir=sweep \
      --sweep

Several study processes (or workers, or jobs) may share one work directory: each run is
trained once, by the worker that claims it; a run whose worker died is resumed by the next.
The study evaluates and reports when every run is done; started again, it trains only what is
missing. Finished runs and score tables are reused only if they were made with the same config;
otherwise the study stops, naming the keys that differ, unless --reuse_stale (or use a new
--workdir). See experiments/configs/study.py for the configurations, folds and datasets.
"""

import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from xeno_jax.study import launch, sweeps
from xeno_jax.study.study import run_study

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the study.", required=True)
_REUSE_STALE = flags.DEFINE_bool(
    "reuse_stale", False, "Reuse finished runs and score tables made with a different config "
    "instead of refusing them.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", launch.LAUNCHERS,
                              "Where the training runs run (xeno_jax.study.launch).")
_PRINT_RUNS = flags.DEFINE_bool("print_runs", False,
                                "Print one shell command per missing run and exit.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every point of the config file's sweep(), "
                           "each a study in <workdir>/<point>, sharing the data directory.")
_POINT = flags.DEFINE_string("sweep_point", None, "Run only this point of the sweep.")
_RUN = flags.DEFINE_string("run", None, "Train only this run (<configuration>/outer_<i>/"
                           "fold_<k>); the last one to finish evaluates and reports.")


def main(argv):
    del argv
    config = common.resolve_study(_CONFIG.value, _WORKDIR.value)
    studies = [("", config)]  # (work directory below --workdir, study config)
    if _SWEEP.value or _POINT.value:
        points = sweeps.points(config_flags.get_config_filename(flags.FLAGS["config"]))
        studies = [(sweeps.point_name(p), sweeps.apply_point(config, p)) for p in points]
        known = [name for name, _ in studies]
        if _POINT.value:
            studies = [(name, c) for name, c in studies if name == _POINT.value]
            if not studies:
                raise app.UsageError(f"--sweep_point={_POINT.value!r}: the sweep has {known}")
    if _PRINT_RUNS.value:
        for name, study in studies:
            argv = [a for a in sys.argv if not a.startswith(("--sweep", "--nosweep"))]
            argv += [f"--sweep_point={name}"] if name else []
            for command in launch.run_commands(argv, study, Path(_WORKDIR.value, name),
                                               reuse_stale=_REUSE_STALE.value):
                print(command)
        return
    common.start()
    for name, study in studies:
        report = run_study(study, Path(_WORKDIR.value, name), launcher=_LAUNCHER.value,
                           run=_RUN.value, reuse_stale=_REUSE_STALE.value)
        logging.info("report: %s", report if report else "not yet, runs are missing")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
