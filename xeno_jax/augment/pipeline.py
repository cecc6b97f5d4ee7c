"""Augmentation pipelines composed from a list of steps (a config's ``augment`` section).

A pipeline is a list of steps, each a mapping (a dict or an ml_collections ``ConfigDict``) with a
``name`` and the keyword arguments of its op::

    [{"name": "affine", "p": 0.5}, {"name": "hflip", "p": 0.25}, {"name": "vflip", "p": 0.25},
     {"name": "projection", "p": 0.8, "target_labels": ["kidney"]},
     {"name": "transplant", "p": 0.8}, {"name": "l1_normalize"}]

`build_pipeline` turns it into one pure function ``augment(key, batch, bank=None) -> batch`` over a
batch dict with ``features`` float32 ``(B, H, W, C)``, ``labels`` int32 ``(B, H, W)`` and ``valid``
bool ``(B, H, W)`` (other entries pass through). The steps run in order with keys split from
`key`; afterwards every image left without a valid pixel reverts to its input (features, labels
and valid mask). The projection step uses the `ProjectionBank` given to `augment` or, failing
that, the one given to `build_pipeline`; either way the whole pipeline jits. A pipeline with a
projection step adds ``projected_pixels`` to the batch: the int32 number of pixels its
projections transformed (before any reverting).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from xeno_jax.augment.geometric import (
    affine_then_flips,
    random_affine,
    random_horizontal_flip,
    random_vertical_flip,
)
from xeno_jax.augment.spectral import l1_renormalize, project_spectra_counted
from xeno_jax.augment.transplant import transplant_organs
from xeno_jax.labels import SPECIES_12, LabelMapping
from xeno_jax.projections.bank import ProjectionBank

Batch = dict[str, Any]

_MASK_OPS = {
    "affine": random_affine,
    "hflip": random_horizontal_flip,
    "vflip": random_vertical_flip,
    "transplant": transplant_organs,
}
# The projection step runs `project_spectra_counted` (features and the projected-pixel count).
STEP_OPS = {**_MASK_OPS, "projection": project_spectra_counted, "l1_normalize": l1_renormalize}
STEP_NAMES = tuple(STEP_OPS)


def step_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments a step takes (those of its op)."""
    return tuple(p.name for p in inspect.signature(STEP_OPS[name]).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def steps_from_config(augment: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The steps a config's ``augment`` section names, each with the values of its section.

    ``augment.steps`` is the ordered tuple of step names; ``augment.<name>`` holds the keyword
    arguments of that step (``experiments/configs/run.py`` sets the paper's values). A
    projection step's empty ``target_labels`` means every label of the bank.

    Raises:
      ValueError: for an unknown step name or a step without a section.
    """
    steps = []
    for i, name in enumerate(augment["steps"]):
        if name not in STEP_NAMES:
            raise ValueError(f"config.augment.steps[{i}]: unknown step {name!r}; expected one "
                             f"of {STEP_NAMES}")
        section = augment.get(name)
        if section is None:
            raise ValueError(f"config.augment.steps names {name!r} but config.augment has no "
                             f"section {name!r} with its values")
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        if name == "projection" and not values.get("target_labels"):
            values["target_labels"] = None
        steps.append({"name": name, **values})
    return tuple(steps)


def build_pipeline(steps: Sequence[Mapping[str, Any]], bank: ProjectionBank | None = None, *,
                   label_mapping: LabelMapping = SPECIES_12
                   ) -> Callable[..., Batch]:
    """Composes augmentation steps into ``augment(key, batch, bank=None) -> batch``.

    Args:
      steps: step configs (see the module docstring); names in `STEP_NAMES`.
      bank: the projections for a ``projection`` step, unless given to ``augment``.
      label_mapping: resolves label names in a projection step's ``target_labels``.

    Returns:
      The pure, jittable augmentation function.

    Raises:
      ValueError: for an unknown step name or an argument its op does not take.
    """
    ops = [_build_step(i, step, label_mapping) for i, step in enumerate(steps)]
    groups = _group_geometric_runs(steps, ops)
    projection_steps = [i for i, step in enumerate(steps) if step.get("name") == "projection"]
    default_bank = bank

    def augment(key: jax.Array, batch: Batch, bank: ProjectionBank | None = None) -> Batch:
        bank = default_bank if bank is None else bank
        if projection_steps and bank is None:
            raise ValueError(f"step {projection_steps[0]} (projection) needs a ProjectionBank: "
                             "pass it to build_pipeline or to augment")
        missing = {"features", "labels", "valid"} - set(batch)
        if missing:
            raise ValueError(f"the batch lacks {sorted(missing)}; it has {sorted(batch)}")
        augmented = dict(batch)
        keys = jax.random.split(key, len(ops))
        for start, stop, op in groups:  # every step gets its own key, merged or not
            augmented = op(keys[start:stop], augmented, bank)
        return revert_invalid_images(augmented, batch)

    return augment


def _group_geometric_runs(steps: Sequence[Mapping[str, Any]], ops: Sequence[Callable]):
    """``(start, stop, op(keys, batch, bank))`` per step, with each run of an affine step and the
    flips after it merged into one `affine_then_flips` (the same result, one gather)."""
    names = [step.get("name") for step in steps]
    groups, i = [], 0
    while i < len(steps):
        stop = i + (names[i] == "affine")
        while stop < len(steps) and names[stop] in ("hflip", "vflip"):
            stop += 1
        if stop - i >= 2:
            kwargs = [{k: v for k, v in dict(step).items() if k != "name"}
                      for step in steps[i:stop]]
            affine = kwargs[0] if names[i] == "affine" else None
            flips = list(zip(names[i + (affine is not None):stop],
                             kwargs[(affine is not None):], strict=True))
            groups.append((i, stop, _merged_geometric(affine, flips)))
            i = stop
        else:
            groups.append((i, i + 1, lambda keys, batch, bank, op=ops[i]: op(keys[0], batch,
                                                                             bank)))
            i += 1
    return groups


def _merged_geometric(affine, flips):
    def transform(keys, batch, bank):
        del bank
        features, labels, valid = affine_then_flips(
            keys, batch["features"], batch["labels"], batch["valid"], affine=affine, flips=flips)
        return {**batch, "features": features, "labels": labels, "valid": valid}

    return transform


def revert_invalid_images(augmented: Batch, original: Batch) -> Batch:
    """Replaces every image without a valid pixel by its original (features, labels, valid)."""
    empty = ~jnp.any(augmented["valid"], axis=(1, 2))
    result = dict(augmented)
    for name in ("features", "labels", "valid"):
        x = augmented[name]
        result[name] = jnp.where(empty.reshape((-1,) + (1,) * (x.ndim - 1)), original[name], x)
    return result


def _build_step(index: int, step: Mapping[str, Any], label_mapping: LabelMapping):
    """One step as ``op(key, batch, bank) -> batch``."""
    step = dict(step)
    name = step.pop("name", None)
    if name not in STEP_NAMES:
        raise ValueError(f"step {index}: unknown name {name!r}; expected one of {STEP_NAMES}")
    op = STEP_OPS[name]
    accepted = list(step_arguments(name))
    unknown = sorted(set(step) - set(accepted))
    if unknown:
        raise ValueError(f"step {index} ({name}): unknown arguments {unknown}; {name} takes "
                         f"{accepted}")

    if name == "l1_normalize":
        return lambda key, batch, bank: {**batch, "features": l1_renormalize(batch["features"])}
    if name == "projection":
        if step.get("target_labels") is not None:
            step["target_labels"] = _label_indices(index, step["target_labels"], label_mapping)

        def project(key, batch, bank):
            features, count = project_spectra_counted(key, batch["features"], batch["labels"],
                                                      bank, **step)
            return {**batch, "features": features,
                    "projected_pixels": batch.get("projected_pixels", 0) + count}

        return project

    def transform(key, batch, bank):
        features, labels, valid = op(key, batch["features"], batch["labels"], batch["valid"],
                                     **step)
        return {**batch, "features": features, "labels": labels, "valid": valid}

    return transform


def _label_indices(index: int, labels: Sequence[str | int],
                   label_mapping: LabelMapping) -> tuple[int, ...]:
    """Label names or indices -> a sorted tuple of valid indices."""
    indices = []
    for label in labels:
        value = label_mapping.name_to_index(label) if isinstance(label, str) else int(label)
        if not label_mapping.is_valid(value):
            raise ValueError(f"step {index} (projection): target label {label!r} is not a valid "
                             "label of the label mapping")
        indices.append(value)
    return tuple(sorted(set(indices)))
