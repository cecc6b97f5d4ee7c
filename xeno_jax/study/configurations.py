"""The paper's training configurations (method.md A3) as ml_collections configs.

A configuration is named as the reference names its runs:

- ``baseline_<species>``: trained on the species' physiological images;
- ``projected-malperfusion_<source>2<target>`` / ``projected-ICG_<source>2<target>``: the same,
  plus the xeno-learning augmentation with the source species' malperfusion (kidney) or ICG
  projections;
- ``joint_pig-p+rat-p2human``: human plus physiological pig and rat images.

The files in ``experiments/configs`` build their configs with these functions.
`run_config(name, quick=..., dataset=...)` returns the full config of one training run: the
training sections of `xeno_jax.train.default_config` plus ``data`` (which images), ``augment``
(the A4 pipeline and its projection bank) and ``evaluate``. ``quick`` shrinks the network and the
schedule for a CPU (the demo); ``dataset`` is the builder config (``sim_small``, ``sim_full`` or
``tivita``); ``model`` selects the network, e.g. ``unet_efficientnet_b5`` (the reference's).
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections
from ml_collections import config_dict

from xeno_jax.labels import PATHOLOGY_LABELS, SPECIES_12
from xeno_jax.models import MODEL_NAMES
from xeno_jax.train.config import default_config

GEOMETRIC_STEPS = ("affine", "hflip", "vflip")
PAPER_CONFIGURATIONS = (
    "baseline_human", "baseline_pig", "baseline_rat",
    "projected-malperfusion_rat2pig", "projected-malperfusion_pig2rat",
    "projected-malperfusion_pig2human", "projected-malperfusion_rat2human",
    "projected-malperfusion_pig2pig",
    "projected-ICG_rat2pig", "projected-ICG_pig2rat",
    "joint_pig-p+rat-p2human",
)
_PATTERNS = (
    re.compile(r"^baseline_(?P<target>[a-z]+)$"),
    re.compile(r"^projected-(?P<pathology>malperfusion|ICG)_(?P<source>[a-z]+)2(?P<target>[a-z]+)$"),
    re.compile(r"^joint_(?P<extra>[a-z]+-p(\+[a-z]+-p)*)2(?P<target>[a-z]+)$"),
)


@dataclasses.dataclass(frozen=True)
class Configuration:
    """A parsed configuration name."""

    name: str
    target: str
    source: str = ""
    pathology: str = ""
    extra_species: tuple[str, ...] = ()

    @property
    def is_projected(self) -> bool:
        return bool(self.source)


def parse_configuration(name: str) -> Configuration:
    """Parses ``baseline_human``, ``projected-ICG_rat2pig``, ``joint_pig-p+rat-p2human``, ..."""
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if match:
            groups = match.groupdict()
            extra = tuple(s[:-2] for s in groups["extra"].split("+")) if groups.get("extra") else ()
            return Configuration(name, groups["target"], groups.get("source") or "",
                                 groups.get("pathology") or "", extra)
    raise ValueError(f"unknown configuration {name!r}; expected baseline_<species>, "
                     f"projected-<malperfusion|ICG>_<source>2<target> or "
                     f"joint_<species>-p+...2<target>, e.g. {PAPER_CONFIGURATIONS}")


def run_config(name: str, *, quick: bool = False, dataset: str = "sim_small",
               model: str = "") -> ml_collections.ConfigDict:
    """The locked config of one training run of configuration `name`.

    `model` names the network (`xeno_jax.models.MODEL_NAMES`, e.g. "unet_efficientnet_b5",
    the reference's); "" keeps the default: our U-Net, its tiny variant with `quick`.
    """
    parsed = parse_configuration(name)
    if model and model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; known: {MODEL_NAMES}")
    config = default_config()
    with config.unlocked():
        config.configuration = name
        config.model.name = model or config.model.name

        config.data = ml_collections.ConfigDict()
        config.data.data_dir = "~/tensorflow_datasets"  # TFDS data directory
        config.data.dataset = dataset  # builder config: sim_small | sim_full | tivita
        config.data.species = parsed.target
        config.data.extra_species = parsed.extra_species  # joint: physiological images added
        config.data.outer_fold = 0  # nested cross-validation: outer fold (test set) ...
        config.data.fold = 0  # ... and inner fold (train/val) of this run
        # Data spec (reference JSON format): "" ours; a file; or a folder of the reference's
        # spec files (<species>_semantic-only_5folds_nested-<outer>-2_mapping-12_seed-0.json).
        config.data.spec = ""
        config.data.num_threads = 4  # grain reader threads

        # The A4 augmentation (method.md): the steps in order, then each step's values (the
        # keyword arguments of its op in xeno_jax.augment; STEP_NAMES lists the steps).
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


def parse_options(options: list[str], arg: str) -> tuple[bool, str, str]:
    """``quick``, a dataset and a model name (`MODEL_NAMES`) from config-argument options."""
    models = [p for p in options if p in MODEL_NAMES]
    datasets = [p for p in options if p != "quick" and p not in MODEL_NAMES]
    if len(datasets) > 1 or len(models) > 1:
        raise ValueError(f"unexpected config arguments {datasets + models} in {arg!r}")
    return ("quick" in options, datasets[0] if datasets else "sim_small",
            models[0] if models else "")


# Values the study sets itself, per run (from the configuration's name and the folds) or from
# its own keys (dataset, data_dir, data.spec, model): not among the study's overrides.
PER_RUN_KEYS = ("configuration", "data.data_dir", "data.dataset", "data.species",
                "data.extra_species", "data.outer_fold", "data.fold", "data.spec", "model.name",
                "augment.source", "augment.pathology")


def override_placeholders() -> ml_collections.ConfigDict:
    """Every value of a run config except `PER_RUN_KEYS`, as an unset placeholder of its type.

    The study config's ``overrides``: ``--config.overrides.augment.projection.p=0.5`` sets that
    value in every run; misspelt keys are errors that name them (the config is locked).
    """
    def placeholders(section: ml_collections.ConfigDict, prefix: str):
        result = ml_collections.ConfigDict()
        for key, value in section.items():
            if f"{prefix}{key}" in PER_RUN_KEYS:
                continue
            result[key] = (placeholders(value, f"{prefix}{key}.")
                           if isinstance(value, ml_collections.ConfigDict)
                           else config_dict.placeholder(type(value)))
        return result

    return placeholders(run_config("projected-malperfusion_pig2human"), "")


def apply_overrides(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict
                    ) -> None:
    """Sets every value of `overrides` (nested like `config`) that is not None in `config`."""
    for key, value in overrides.items():
        if isinstance(value, ml_collections.ConfigDict):
            apply_overrides(config[key], value)
        elif value is not None:
            config[key] = value


def config_from_arg(arg: str, kind: str) -> ml_collections.ConfigDict:
    """Parses ``<what>[,quick][,<dataset>][,<model>]`` for baseline/xeno/joint configs."""
    parts = [p for p in (arg or "").split(",") if p]
    if not parts:
        raise ValueError(f"{kind} config needs an argument, e.g. {kind}.py:human,quick")
    quick, dataset, model = parse_options(parts[1:], arg)
    what = parts[0]
    name = {"baseline": f"baseline_{what}",
            "xeno": what if what.startswith("projected-") else f"projected-malperfusion_{what}",
            "joint": f"joint_{what}"}[kind]
    return run_config(name, quick=quick, dataset=dataset, model=model)
