"""One training run of the study: every value of the paper's recipe (docs/method.md A3, A4).

Argument: ``<configuration>[,quick][,<dataset>][,<model>]`` with a configuration named as the
reference names its runs (``baseline_human``, ``projected-malperfusion_pig2human``,
``projected-ICG_rat2pig``, ``joint_pig-p+rat-p2human``; see
`xeno_jax.study.configurations`), e.g.::

  python -m experiments.train --config=experiments/configs/run.py:baseline_human \
      --workdir=runs/bh
  python -m experiments.train \
      --config=experiments/configs/run.py:projected-malperfusion_pig2human,quick,sim_tiny \
      --config.augment.projection.p=0.5 --config.augment.steps='("projection","l1_normalize")' \
      --workdir=runs/x

The model, training and parallel sections start from the trainer's defaults (the reference's
set-up, `xeno_jax.train.default_config`); this file adds which images (``data``), the A4
augmentation pipeline with the values of each step (``augment``), ``evaluate``, and the
``quick`` settings of a CPU run. The study builds every run's config with this file (its
``config.run_config``); baseline.py, xeno.py and joint.py name configurations for it.
"""

import ml_collections

from xeno_jax.labels import PATHOLOGY_LABELS, SPECIES_12
from xeno_jax.study.configurations import parse_configuration, parse_options
from xeno_jax.train.config import default_config

GEOMETRIC_STEPS = ("affine", "hflip", "vflip")


def get_config(arg: str = "baseline_human") -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    if not parts:
        raise ValueError("run config needs a configuration, e.g. run.py:baseline_human,quick")
    quick, dataset, model = parse_options(parts[1:], arg)
    parsed = parse_configuration(parts[0])
    if parsed.is_rule:
        raise ValueError(f"{parsed.name} trains no network: it relabels the predictions of "
                         f"{parsed.trained_as}'s networks; train that configuration")
    config = default_config()
    with config.unlocked():
        config.configuration = parsed.name
        config.model.name = model or config.model.name

        config.data = ml_collections.ConfigDict()
        config.data.data_dir = "~/tensorflow_datasets"  # TFDS data directory
        config.data.dataset = dataset  # builder config: sim_small | sim_full | tivita | ...
        config.data.species = parsed.target
        config.data.extra_species = parsed.extra_species  # joint: physiological images added
        config.data.outer_fold = 0  # nested cross-validation: outer fold (test set) ...
        config.data.fold = 0  # ... and inner fold (train/val) of this run
        # Data spec (reference JSON format): "" ours; a file; or a folder of the reference's
        # spec files (<species>_semantic-only_5folds_nested-<outer>-2_mapping-12_seed-0.json).
        config.data.spec = ""
        config.data.num_threads = 4  # grain reader threads

        # The A4 augmentation: the steps in order, then each step's values (the keyword
        # arguments of its op in xeno_jax.augment; STEP_NAMES lists the steps).
        config.augment.steps = (
            (*GEOMETRIC_STEPS, "projection", "transplant", "l1_normalize") if parsed.is_projected
            else (*GEOMETRIC_STEPS, "transplant"))
        # Kornia RandomAffine as the reference: angle U[-degrees, degrees], shifts of up to
        # translate x the image size, one isotropic scale; reflection padding.
        config.augment.affine = ml_collections.ConfigDict(
            {"p": 0.5, "degrees": 45.0, "translate": 0.0625, "scale": (0.9, 1.1)})
        config.augment.hflip = ml_collections.ConfigDict({"p": 0.25})
        config.augment.vflip = ml_collections.ConfigDict({"p": 0.25})
        # Xeno-learning: each image with probability p gets every target label's spectra
        # mapped by a random projection of that label (label_match), interpolated with the
        # identity by a random weight; () targets every label of the bank.
        config.augment.projection = ml_collections.ConfigDict({
            "p": 0.8, "label_mode": "label_match", "interpolate": True,
            "target_labels": PATHOLOGY_LABELS.get(parsed.pathology, ()),
            "max_label": SPECIES_12.num_classes, "tile_size": 2048})
        config.augment.l1_normalize = ml_collections.ConfigDict()  # the spectra again
        # Organ transplantation: int(p * batch) donors, one organ each.
        config.augment.transplant = ml_collections.ConfigDict(
            {"p": 0.8, "num_classes": SPECIES_12.num_classes})
        config.augment.source = parsed.source  # species whose projections are applied
        config.augment.pathology = parsed.pathology  # malperfusion | ICG
        # "learned": the source's maps; "random": random maps of their sizes (the control).
        config.augment.maps = "random" if parsed.control == "random" else "learned"
        config.augment.bank = ""  # projection bank file; "" learns/uses the default one

        config.evaluate = ml_collections.ConfigDict()
        config.evaluate.batch_size = 8

        if quick:  # ~4 minutes per network on 2 CPU cores with sim_small
            config.model.variant = "tiny"
            config.train.epochs = 10
            config.train.epoch_size = 800  # 1000 steps in all
            config.train.learning_rate = 3e-3  # a short schedule for a small network
            config.train.checkpoint_every_steps = 200
            config.train.validate_every_epochs = 1000  # validation only at the end
            config.train.log_every_steps = 20
    return config
