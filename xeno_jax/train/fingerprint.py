"""Fingerprints: what a piece of work was made with, so that stale work is never reused silently.

A run's fingerprint is the flat view ``{"train.learning_rate": 0.001, ...}`` of its config
without the keys in `IGNORED_KEYS`, plus what the config does not hold but the result depends
on: the number of devices the data mesh really has (``parallel.num_devices`` resolved) and a
digest of the augmentation data (the projection bank's arrays). Its ``digest`` is the SHA-256
of the canonical JSON of those values, the same in every process and run.

Checkpoints, ``done.json`` and the study's score tables store a fingerprint; work whose stored
fingerprint differs from the current one is refused with a `StaleWorkError` naming the keys
that differ, unless the caller asks to reuse it anyway (``--reuse_stale``) or uses a new work
directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from xeno_jax.train.config import num_mesh_devices

IGNORED_KEYS = frozenset({
    "data.data_dir",  # where the datasets are stored, not which (data.dataset is kept)
    "data.num_threads",  # reader threads: the order of examples does not depend on them
    "evaluate.batch_size",  # images per evaluation batch: the same scores
    "train.log_every_steps",  # logging only
    "train.checkpoint_every_steps",  # resuming from any checkpoint is bit-exact
    "train.keep_checkpoints",
    "train.validate_every_epochs",  # validation reads the model, never changes it
    "augment.bank",  # a path: the bank's content is fingerprinted instead ("augment_data")
})
"""Config keys whose values cannot change a trained network or its scores."""


class StaleWorkError(RuntimeError):
    """Existing work was made with a different config than the current one."""


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The result-relevant values of a piece of work.

    Attributes:
      values: ``{dotted key: JSON value}``.
    """

    values: Mapping[str, Any]

    @property
    def digest(self) -> str:
        text = json.dumps(dict(self.values), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "values": dict(self.values)}

    def differences(self, stored: Mapping[str, Any]) -> list[str]:
        """``"key: stored -> current"`` for every key whose value differs from `stored`."""
        keys = sorted(set(stored) | set(self.values))
        missing = "(absent)"
        return [f"{k}: {json.dumps(stored.get(k, missing))} -> "
                f"{json.dumps(self.values.get(k, missing))}"
                for k in keys if stored.get(k, missing) != self.values.get(k, missing)]


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` of a (nested) config, values as canonical JSON values."""
    nested = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    flat = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[key] = json.loads(json.dumps(value, default=str))  # tuples -> lists, ...
    return flat


def tree_digest(tree: Any) -> str:
    """SHA-256 of a pytree's structure and of every leaf's dtype, shape and bytes."""
    digest = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    digest.update(str(treedef).encode())
    for leaf in leaves:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def of_run(config: ml_collections.ConfigDict, augment_data: Any = None) -> Fingerprint:
    """The fingerprint of a training run: its config and its augmentation data."""
    values = {k: v for k, v in flatten(config).items() if k not in IGNORED_KEYS}
    values["parallel.num_devices"] = num_mesh_devices(config)
    if augment_data is not None:
        values["augment_data"] = tree_digest(augment_data)
    return Fingerprint(values)


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A fingerprint record stored as JSON, or None if the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logging.warning("%s: unreadable fingerprint record (%s)", path, e)
        return None
    return record if isinstance(record, dict) else None


def check(current: Fingerprint, stored: Mapping[str, Any] | None, *, what: str,
          reuse_stale: bool = False) -> None:
    """Refuses work whose stored fingerprint record (``to_json()``) is not `current`.

    Args:
      current: the fingerprint of the config in use now.
      stored: the record stored with the work, or None if the work has none.
      what: the work, for messages (e.g. "the checkpoint /runs/x/checkpoints/100").
      reuse_stale: log a warning instead of raising.

    Raises:
      StaleWorkError: naming the keys that differ, and what to do.
    """
    if stored is not None and stored.get("digest") == current.digest:
        return
    if stored is None or not isinstance(stored.get("values"), Mapping):
        reason = "records no fingerprint of the config it was made with"
    else:
        reason = ("was made with a different config: "
                  + "; ".join(current.differences(stored["values"])))
    if reuse_stale:
        logging.warning("reusing %s although it %s (--reuse_stale)", what, reason)
        return
    raise StaleWorkError(f"{what} {reason}. Use a new work directory, or pass --reuse_stale to "
                         "reuse it anyway")
