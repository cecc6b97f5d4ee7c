"""The xeno-learning study (method.md A3 configurations, C3 evaluation).

Arguments: ``full`` (default: the paper's 11 configurations, 3 outer x 5 inner folds) or ``demo``
(baseline_human and projected-malperfusion_pig2human, one fold, quick CPU settings), then
optionally ``,quick``, a dataset config (``sim_small`` default, ``sim_full``, ``tivita``) and a
network (``unet_efficientnet_b5``, the reference's; default our U-Net)::

  python -m experiments.study --config=experiments/configs/study.py:demo --workdir=workdir
  python -m experiments.study --config=experiments/configs/study.py --workdir=study
  python -m experiments.study --config=experiments/configs/study.py:full,sim_full \
      --workdir=study_full
  python -m experiments.study --config=experiments/configs/study.py:full,tivita \
      --config.data_dir=/data/tfds --workdir=study_real
  python -m experiments.study \
      --config=experiments/configs/study.py:full,sim_full,unet_efficientnet_b5 \
      --config.overrides.model.dtype=bfloat16 --workdir=study_b5
  python -m experiments.study --config=experiments/configs/study.py \
      --config.configurations='("baseline_pig","projected-ICG_rat2pig")' \
      --config.outer_folds='(0,)' --config.folds='(0,1)' --workdir=study_icg
  python -m experiments.study --config=experiments/configs/study.py:demo \
      --config.overrides.train.epochs=2 --workdir=smoke

An interrupted study resumes: finished datasets, banks, runs and score tables are reused.
"""

import ml_collections
from ml_collections import config_dict

from xeno_jax.study.configurations import PAPER_CONFIGURATIONS, parse_options
from xeno_jax.study.study import TEST_SETS

DEMO_CONFIGURATIONS = ("baseline_human", "projected-malperfusion_pig2human")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "full").split(",") if p]
    kind, options = parts[0], parts[1:]
    if kind not in ("full", "demo"):
        raise ValueError(f"study config argument must start with 'full' or 'demo', got {arg!r}")
    quick, dataset, model = parse_options(options, arg)
    config = ml_collections.ConfigDict()
    config.configurations = PAPER_CONFIGURATIONS if kind == "full" else DEMO_CONFIGURATIONS
    config.outer_folds = (0, 1, 2) if kind == "full" else (0,)
    config.folds = (0, 1, 2, 3, 4) if kind == "full" else (0,)
    config.quick = kind == "demo" or quick
    config.dataset = dataset
    config.model = model  # "" : our U-Net; e.g. "unet_efficientnet_b5": the reference's
    config.data_dir = ""  # TFDS data directory; "" means <workdir>/tfds
    config.test_sets = TEST_SETS if kind == "full" else ("physiological", "malperfusion")
    config.evaluate_batch_size = 8
    # The data specs: "" ours, else a folder of the reference's spec files (or one file).
    config.data = ml_collections.ConfigDict({"spec": ""})
    # Values that replace those of every training run (unset: the configuration's own).
    config.overrides = ml_collections.ConfigDict()
    config.overrides.train = ml_collections.ConfigDict({
        "epochs": config_dict.placeholder(int), "epoch_size": config_dict.placeholder(int),
        "batch_size": config_dict.placeholder(int),
        "learning_rate": config_dict.placeholder(float)})
    config.overrides.model = ml_collections.ConfigDict({
        "variant": config_dict.placeholder(str), "dtype": config_dict.placeholder(str)})
    config.overrides.parallel = ml_collections.ConfigDict({
        "backend": config_dict.placeholder(str), "num_devices": config_dict.placeholder(int)})
    config.lock()
    return config
