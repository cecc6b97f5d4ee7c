"""Scores trained networks on a test set and prints class-level DSC (and NSD) per label.

One --workdir scores that run; several score their ensemble (mean softmax, method.md C3),
predicted data-parallel on all devices (`xeno_jax.train.predictor`, as validation and the study
predict). Every run directory must hold a finished run of --config (its folds are read from its
done.json) or networks converted from PyTorch (``experiments.convert_weights``; a folder of
converted folds is their ensemble, scored as outer fold --config.data.outer_fold).

  python -m experiments.evaluate --config=experiments/configs/baseline.py:human,quick \
      --workdir=runs/bh --test_set=physiological
  python -m experiments.evaluate --config=experiments/configs/xeno.py:pig2human,quick \
      --workdir=runs/x0 --workdir=runs/x1 --test_set=malperfusion --output=scores/x.npz
  python -m experiments.evaluate --config=experiments/configs/baseline.py:human,tivita \
      --workdir=nets/reference_baseline_human --test_set=physiological

Test sets: ``physiological`` (the target species' outer-fold test images), ``cross_species``
(the other species' physiological images), ``malperfusion`` and ``icg`` (the target species'
pathological images). --output saves the per-image scores (`xeno_jax.evaluate.ScoreTable`).
"""

import json
import logging
from pathlib import Path

import flax.linen as nn
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import common
from xeno_jax.models import convert, load_pretrained
from xeno_jax.study import datasets, evaluation, runs
from xeno_jax.study.configurations import parse_configuration
from xeno_jax.study.report import class_table
from xeno_jax.study.study import TEST_SETS, Evaluation, score_test_set

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Run directory (repeat: ensemble).",
                                      required=True)
_TEST_SET = flags.DEFINE_enum("test_set", "physiological", TEST_SETS, "Images to score.")
_OUTPUT = flags.DEFINE_string("output", "", "Optional .npz path for the per-image scores.")


def run_config_of(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """--config set to the folds of the finished run in `workdir` (read from its done.json)."""
    done = Path(workdir) / runs.DONE_FILE
    if not done.exists():
        raise FileNotFoundError(f"{done} missing: {workdir} holds no finished run")
    record = json.loads(done.read_text())
    if record.get("configuration") != config.configuration:
        raise ValueError(f"{done}: run of {record.get('configuration')!r}, but --config is "
                         f"{config.configuration!r}")
    return runs.train_config_of(config, int(record.get("outer_fold", config.data.outer_fold)),
                                int(record.get("fold", config.data.fold)))


def load_models(config: ml_collections.ConfigDict, workdirs: list[str]
                ) -> list[tuple[int, ml_collections.ConfigDict | nn.Module, dict]]:
    """``(outer fold, run config or converted network, final variables)`` of every model: the
    finished run in a directory, or the networks converted from PyTorch there (a folder of
    converted folds is their ensemble, scored as outer fold --config.data.outer_fold)."""
    models = []
    for workdir in workdirs:
        converted = convert.find_pretrained(workdir)  # e.g. a reference run's converted folds
        for directory in converted:
            model, variables = load_pretrained(str(directory))
            models.append((config.data.outer_fold, model, variables))
        if converted:
            continue
        run = run_config_of(config, workdir)
        models.append((run.data.outer_fold, run, runs.restore_variables(run, workdir)))
    return models


def main(argv):
    del argv
    common.start()
    config = _CONFIG.value
    models = load_models(config, _WORKDIRS.value)
    parsed = parse_configuration(config.configuration)
    table = score_test_set(parsed, _TEST_SET.value, models, dataset=config.data.dataset,
                           data_dir=datasets.data_dir_of(config),
                           batch_size=config.evaluate.batch_size)
    if table is None:
        raise SystemExit(f"{parsed.target} has no {_TEST_SET.value!r} images in "
                         f"{config.data.dataset}")
    if _OUTPUT.value:
        table.save(_OUTPUT.value)
        logging.info("scores: %s", _OUTPUT.value)
    evaluations = [Evaluation(config.configuration, _TEST_SET.value, table)]
    for metric in table.scores:
        if metric not in evaluation.STO2_COLUMNS and not np.isnan(table.scores[metric]).all():
            print(f"\n{metric} ({_TEST_SET.value}, {len(models)} model(s), "
                  f"{len(set(table.image_name))} images), class level with 95% bootstrap CI:\n")
            print(class_table(evaluations, _TEST_SET.value, metric))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
