"""Sweeps declared in config files: a ``sweep()`` next to ``get_config()``.

A config file may define ``sweep()`` returning a list of points, each a dict of dotted config
keys and values (as kauldron's sweeps are), e.g. in ``experiments/configs/study.py``::

    def sweep():
        return [{"overrides.augment.projection.p": p} for p in (0.4, 0.8, 1.0)]

`points` reads them from the file; `apply_point` makes the config of one point, and
`point_name` names the point (its work-directory folder). ``python -m experiments.study
--sweep`` runs every point as a study of its own in ``<workdir>/<point name>``, the points
sharing one data directory.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from xeno_jax.study.configurations import config_module


def points(config_file: str | os.PathLike) -> list[dict[str, Any]]:
    """The points of the ``sweep()`` of a config file (``path[:argument]``; ValueError if it
    has none)."""
    module = config_module(config_file)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{config_file} defines no sweep(); add one that returns a list of "
                         "{dotted config key: value} dicts")
    result = [dict(point) for point in module.sweep()]
    names = [point_name(p) for p in result]
    if len(set(names)) != len(names):
        raise ValueError(f"{config_file}: sweep() repeats points {names}")
    return result


def point_name(point: Mapping[str, Any]) -> str:
    """``key=value,key=value`` with each key's last two parts, as a folder name."""
    parts = [f"{'.'.join(key.split('.')[-2:])}={value}" for key, value in point.items()]
    return re.sub(r"[^\w.=,+-]", "", ",".join(parts)) or "default"


def apply_point(config: ml_collections.ConfigDict, point: Mapping[str, Any]
                ) -> ml_collections.ConfigDict:
    """A copy of `config` with the point's values (a misspelt key is an error naming it)."""
    result = copy.deepcopy(config)
    for key, value in point.items():
        *path, last = key.split(".")
        section = result
        for part in path:
            if part not in section:
                raise KeyError(f"sweep point {dict(point)}: no config key {key!r} ({part!r} "
                               "does not exist)")
            section = section[part]
        if last not in section:
            raise KeyError(f"sweep point {dict(point)}: no config key {key!r}")
        section[last] = value
    return result
