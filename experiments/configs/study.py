"""The xeno-learning study (method.md A3 configurations, C3 evaluation).

Arguments: ``full`` (default: the paper's 11 configurations, 3 outer x 5 inner folds),
``controls`` (the pig-to-human kidney transfer next to its controls, `CONTROLS`: three networks
each, one outer fold, quick CPU settings, every network also scored alone), ``controls_all``
(the same for every transfer of `CONTROLLED_TRANSFERS`, on every test set) or ``demo`` (the
transfer, the baseline, the random control and the rule, one network each, quick settings), then
optionally ``,quick``, a dataset config (``sim_small`` default, ``sim_full``, ``tivita``) and a
network (``unet_efficientnet_b5``, the reference's; default our U-Net)::

  python -m experiments.study --config=experiments/configs/study.py:demo --workdir=workdir
  python -m experiments.study --config=experiments/configs/study.py:controls --workdir=controls
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
  python -m experiments.study --config=experiments/configs/study.py:demo \
      --config.run_config=my_recipe.py --workdir=my_recipe  # runs from another run.py

  python -m experiments.study --config=experiments/configs/study.py --workdir=/shared/study \
      --launcher=submitit --config.launcher.partition=gpu --config.launcher.mem_gb=96

An interrupted study resumes: finished datasets, banks, runs and score tables are reused.
Several study processes may share a work directory (experiments/study.py).
"""

from pathlib import Path

import ml_collections

from experiments.configs import run
from xeno_jax.study.configurations import (
    PAPER_CONFIGURATIONS,
    override_placeholders,
    parse_configuration,
    parse_options,
)
from xeno_jax.study.study import TEST_SETS


def controls_of(transfer: str) -> tuple[str, ...]:
    """A transfer ``projected-<pathology>_<source>2<target>`` with its controls: the target's
    baseline, random maps of the learnt maps' sizes, the StO2 rule (malperfusion: one organ)
    and the oracle (maps learnt in the target)."""
    parsed = parse_configuration(transfer)
    pathology, source, target = parsed.pathology, parsed.source, parsed.target
    return (f"baseline_{target}", transfer, f"projected-random-{pathology}_{source}2{target}",
            *((f"rule-{pathology}_{source}2{target}",) if pathology == "malperfusion" else ()),
            f"projected-{pathology}_{target}2{target}")


CONTROLS = controls_of("projected-malperfusion_pig2human")
"""The kidney transfer to human with its controls."""
CONTROLLED_TRANSFERS = tuple(
    n for n in PAPER_CONFIGURATIONS
    if parse_configuration(n).is_projected
    and parse_configuration(n).source != parse_configuration(n).target)
"""``controls_all``: every transfer of the paper to another species, each with its controls."""
DEMO_CONFIGURATIONS = CONTROLS[:4]
KINDS = ("full", "controls", "controls_all", "demo")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "full").split(",") if p]
    kind, options = parts[0], parts[1:]
    if kind not in KINDS:
        raise ValueError(f"study config argument must start with one of {KINDS}, got {arg!r}")
    quick, dataset, model = parse_options(options, arg)
    config = ml_collections.ConfigDict()
    config.configurations = {
        "full": PAPER_CONFIGURATIONS, "controls": CONTROLS, "demo": DEMO_CONFIGURATIONS,
        "controls_all": tuple(dict.fromkeys(c for t in CONTROLLED_TRANSFERS
                                            for c in controls_of(t)))}[kind]
    config.outer_folds = (0, 1, 2) if kind == "full" else (0,)
    config.folds = (0, 1, 2, 3, 4) if kind == "full" else (0,) if kind == "demo" else (0, 1, 2)
    config.quick = kind != "full" or quick
    config.dataset = dataset
    config.model = model  # "" : our U-Net; e.g. "unet_efficientnet_b5": the reference's
    config.data_dir = ""  # TFDS data directory; "" means <workdir>/tfds
    # The dataset of the test sets and of the oracle's maps, e.g. a diverged one
    # (sim_small-divergence2-from-pig, see data_builders); "": config.dataset.
    config.test_dataset = ""
    config.test_sets = (TEST_SETS if kind in ("full", "controls_all")
                        else ("physiological", "malperfusion"))
    config.evaluate_batch_size = 8
    # Score every network alone too (the report's intervals across networks).
    config.network_scores = kind.startswith("controls")
    # The data specs: "" ours, else a folder of the reference's spec files (or one file).
    config.data = ml_collections.ConfigDict({"spec": ""})
    # Values that replace those of every training run (unset: the run's own); every value of
    # a run config is here (but the study's own, above), e.g.
    # --config.overrides.augment.projection.p=0.5 or --config.overrides.model.dtype=bfloat16.
    config.overrides = override_placeholders(run.get_config("projected-malperfusion_pig2human"))
    # The file whose get_config("<configuration>[,quick][,<dataset>][,<model>]") gives each
    # run's config (its values, before the overrides): the paper's recipe.
    config.run_config = str(Path(run.__file__).resolve())
    if kind == "demo":  # three networks in the 15 minutes of a 2-core demo: 750 of 1000 steps
        config.overrides.train.epoch_size = 600
    # Where the runs train (python -m experiments.study --launcher=local|submitit).
    config.launcher = ml_collections.ConfigDict()
    config.launcher.workers = 1  # local: worker processes at once (1: the study process)
    config.launcher.cluster = "slurm"  # submitit: slurm, or its local / debug executors
    config.launcher.partition = ""  # SLURM partition; "": the cluster's default
    config.launcher.gpus_per_run = 1 if kind == "full" else 0  # per run (per local worker)
    config.launcher.cpus_per_run = 8  # input pipeline threads and the host side of a run
    config.launcher.mem_gb = 64  # host memory per run
    config.launcher.timeout_min = 12 * 60  # time limit per run
    config.launcher.array_parallelism = 64  # most runs of the job array at once
    config.lock()
    return config


def sweep() -> list[dict]:
    """``--sweep``: the probability of the projection step around the paper's 0.8 (each point a
    study of its own; see xeno_jax.study.sweeps)."""
    return [{"overrides.augment.projection.p": p} for p in (0.4, 0.8, 1.0)]
