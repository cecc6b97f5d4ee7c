"""The paper's training configurations (method.md A3) by name, and run configs from files.

A configuration is named as the reference names its runs:

- ``baseline_<species>``: trained on the species' physiological images;
- ``projected-malperfusion_<source>2<target>`` / ``projected-ICG_<source>2<target>``: the same,
  plus the xeno-learning augmentation with the source species' malperfusion (kidney) or ICG
  projections;
- ``joint_pig-p+rat-p2human``: human plus physiological pig and rat images.

Controls of a transfer (issue 11; every one scored on the same test sets as the transfer):

- ``projected-<pathology>_<target>2<target>``: the oracle, maps learnt in the target species
  itself (possible in simulation only; the bank's subjects are left out of every test set);
- ``projected-random-<pathology>_<source>2<target>``: random affine maps with the sizes
  (||W - I||, ||b||) of the source's learnt maps, label by label (does any push that large help?);
- ``rule-malperfusion_<source>2<target>``: no network of its own: the baseline's networks, with
  every pixel whose StO2 index lies below a threshold taken from the source species' malperfused
  images relabelled as the malperfused organ.

The values of a run live in a config file, ``experiments/configs/run.py`` by default: its
``get_config("<configuration>[,quick][,<dataset>][,<model>]")`` returns the full config of one
training run. `run_config` loads it from the file a study config names (``config.run_config``);
`override_placeholders` and `apply_overrides` let a study set any of its values for every run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import types

import ml_collections
from ml_collections import config_dict

from xeno_jax.models import MODEL_NAMES

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
    re.compile(r"^projected(-(?P<control>random))?-(?P<pathology>malperfusion|ICG)_"
               r"(?P<source>[a-z]+)2(?P<target>[a-z]+)$"),
    re.compile(r"^(?P<control>rule)-(?P<pathology>malperfusion)_(?P<source>[a-z]+)2"
               r"(?P<target>[a-z]+)$"),
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
    control: str = ""  # "random" (random maps) or "rule" (StO2 rule on the baseline)

    @property
    def is_projected(self) -> bool:
        """Trained with a projection step (xeno-learning, the oracle, the random control)."""
        return bool(self.source) and self.control != "rule"

    @property
    def is_rule(self) -> bool:
        return self.control == "rule"

    @property
    def trained_as(self) -> str:
        """The configuration whose networks this one uses (the rule's: the baseline's)."""
        return f"baseline_{self.target}" if self.is_rule else self.name

    @property
    def role(self) -> str:
        """What the configuration is in a controlled comparison."""
        if self.is_rule:
            return "rule"
        if self.control == "random":
            return "random maps"
        if self.is_projected:
            return "oracle" if self.source == self.target else "xeno-learning"
        return "joint" if self.extra_species else "baseline"


def parse_configuration(name: str) -> Configuration:
    """Parses ``baseline_human``, ``projected-ICG_rat2pig``, ``joint_pig-p+rat-p2human``, ..."""
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if match:
            groups = match.groupdict()
            extra = tuple(s[:-2] for s in groups["extra"].split("+")) if groups.get("extra") else ()
            return Configuration(name, groups["target"], groups.get("source") or "",
                                 groups.get("pathology") or "", extra,
                                 groups.get("control") or "")
    raise ValueError(f"unknown configuration {name!r}; expected baseline_<species>, "
                     f"projected[-random]-<malperfusion|ICG>_<source>2<target>, "
                     f"rule-malperfusion_<source>2<target> or "
                     f"joint_<species>-p+...2<target>, e.g. {PAPER_CONFIGURATIONS}")


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
                "augment.source", "augment.pathology", "augment.maps")


def config_module(path: str | os.PathLike) -> types.ModuleType:
    """The config file at `path` as a module (``path:argument`` is allowed)."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        path = path.rsplit(":", 1)[0]  # a get_config argument after the file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(
        f"_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(config_file: str | os.PathLike, name: str, *, quick: bool = False,
               dataset: str = "sim_small", model: str = "") -> ml_collections.ConfigDict:
    """The config of one run of configuration `name` from a run config file's ``get_config``
    (``experiments/configs/run.py`` is the paper's recipe)."""
    if model and model not in MODEL_NAMES:  # else parse_options reads it as a dataset
        raise ValueError(f"unknown model {model!r}; known: {MODEL_NAMES}")
    arg = ",".join([name, *(["quick"] if quick else []), dataset, *([model] if model else [])])
    return config_module(config_file).get_config(arg)


def override_placeholders(template: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every value of the run config `template` except `PER_RUN_KEYS`, as an unset placeholder
    of its type.

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

    return placeholders(template, "")


def apply_overrides(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict
                    ) -> None:
    """Sets every value of `overrides` (nested like `config`) that is not None in `config`."""
    for key, value in overrides.items():
        if isinstance(value, ml_collections.ConfigDict):
            apply_overrides(config[key], value)
        elif value is not None:
            config[key] = value
