"""Runs (or resumes) the xeno-learning study and writes <workdir>/report.md.

  python -m experiments.study --config=experiments/configs/study.py:demo --workdir=workdir
  python -m experiments.study --config=experiments/configs/study.py --workdir=study

See experiments/configs/study.py for the configurations, folds and datasets. Finished runs and
score tables are reused only if they were made with the same config; otherwise the study stops,
naming the keys that differ, unless --reuse_stale (or use a new --workdir).
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from xeno_jax.study.study import run_study

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the study.", required=True)
_REUSE_STALE = flags.DEFINE_bool(
    "reuse_stale", False, "Reuse finished runs and score tables made with a different config "
    "instead of refusing them.")


def main(argv):
    del argv
    common.start()
    report = run_study(common.resolve_study(_CONFIG.value, _WORKDIR.value), _WORKDIR.value,
                       reuse_stale=_REUSE_STALE.value)
    logging.info("report: %s", report)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
