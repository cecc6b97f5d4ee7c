"""One training run of a configuration: its images, training, and its finished state.

A run is trained (or resumed) in its work directory and marked finished by ``done.json``,
which holds the fingerprint of its config (`xeno_jax.train.fingerprint`). What a run needs is
found or made by `xeno_jax.study.datasets` (datasets, data specs) and `xeno_jax.study.banks`
(projection banks); its validation scores with `xeno_jax.study.evaluation`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np

from xeno_jax.augment.pipeline import build_pipeline, steps_from_config
from xeno_jax.data import Catalog, Record, train_iterator
from xeno_jax.io import atomic_write
from xeno_jax.io.lock import workdir_lock
from xeno_jax.models import convert, load_pretrained
from xeno_jax.study.banks import ensure_run_bank
from xeno_jax.study.datasets import (
    data_dir_of,
    ensure_catalog,
    ensure_outer_spec,
    semantic_images,
)
from xeno_jax.study.evaluation import class_means, score_images
from xeno_jax.train import fingerprint, train
from xeno_jax.train.loop import restore_final_variables
from xeno_jax.train.parallel import make_mesh

DONE_FILE = "done.json"


def training_images(config: ml_collections.ConfigDict, catalog: Catalog
                    ) -> tuple[list[Record], list[Record]]:
    """Train and validation images of the run's fold (plus the joint model's extra species);
    our data specs are made if missing (`ensure_outer_spec`)."""
    spec = ensure_outer_spec(catalog, config.data.species, config.data.outer_fold,
                             data_dir_of(config), config.data.dataset, config.data.get("spec", ""))
    if not 0 <= config.data.fold < len(spec.folds):
        raise ValueError(f"config.data.fold={config.data.fold}: expected 0..{len(spec.folds) - 1}")
    fold = spec.folds[config.data.fold]
    train_records = catalog.select(fold.train)
    for extra in config.data.extra_species:  # train_<species>-p in the reference's spec
        train_records += semantic_images(catalog, extra)
    # The reference makes each val* split its own validation set; the first is the one we use.
    validation = next(iter(fold.validation_sets.values()), [])
    return train_records, catalog.select(validation)


def run_fingerprint(config: ml_collections.ConfigDict) -> fingerprint.Fingerprint:
    """What a run's result depends on: its config and its projection bank."""
    return fingerprint.of_run(config, ensure_run_bank(config))


def train_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              reuse_stale: bool = False):
    """Trains (or resumes) one run; writes ``done.json`` when it has finished.

    The work directory is locked while the run writes it (`xeno_jax.io.lock`); a finished run
    or checkpoint made with another config (`xeno_jax.train.fingerprint`) is refused unless
    `reuse_stale`.

    Returns:
      The final train state.

    Raises:
      WorkdirBusyError: if another process works in `workdir`.
      StaleWorkError: naming the keys that differ, for work made with another config.
    """
    with workdir_lock(workdir, f"training {config.configuration}",
                      enabled=jax.process_index() == 0):
        return _train_run(config, Path(workdir), reuse_stale)


def _train_run(config: ml_collections.ConfigDict, workdir: Path, reuse_stale: bool):
    data_dir = data_dir_of(config)
    bank = ensure_run_bank(config)
    record = fingerprint.of_run(config, bank)
    if is_done(workdir):
        fingerprint.check(record, read_done(workdir).get("fingerprint"),
                          what=f"the finished run {workdir}", reuse_stale=reuse_stale)
    catalog = ensure_catalog([config.data.species, *config.data.extra_species],
                          config.data.dataset, data_dir)
    train_records, val_records = training_images(config, catalog)
    augment = build_pipeline(steps_from_config(config.augment))
    mesh = make_mesh(config.parallel.num_devices)
    iterator = train_iterator(catalog, train_records, batch_size=config.train.batch_size,
                              mesh=mesh, seed=config.train.seed,
                              domain="species" if config.data.extra_species else None,
                              num_threads=config.data.num_threads)

    def validate(step, predict):
        del step
        table = score_images(catalog, val_records, predict, config.evaluate.batch_size,
                             metrics=("dice",))
        return {"dice": float(np.nanmean(class_means(table)))} if len(table) else {}

    state = train(config, str(workdir), train_iter=iterator, mesh=mesh, augment=augment,
                  augment_data=bank, val_fn=validate if val_records else None,
                  reuse_stale=reuse_stale)
    if jax.process_index() == 0:
        with atomic_write(workdir / DONE_FILE, text=True) as f:
            json.dump({"configuration": config.configuration,
                       "outer_fold": config.data.outer_fold, "fold": config.data.fold,
                       "train_images": len(train_records),
                       "step": int(jax.device_get(state.step)),
                       "fingerprint": record.to_json()}, f)
    return state


def is_done(workdir: str | os.PathLike) -> bool:
    """A finished run, or a converted network put in the run's place (never trained over)."""
    return (Path(workdir) / DONE_FILE).exists() or convert.is_pretrained(workdir)


def read_done(workdir: str | os.PathLike) -> dict:
    """The ``done.json`` record of a finished run.

    Raises:
      ValueError: naming the file, if it is not a JSON object.
    """
    path = Path(workdir) / DONE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to train the run again"
                         ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def finished(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
             reuse_stale: bool = False) -> bool:
    """Whether the run in `workdir` has finished with this config's fingerprint.

    Raises:
      StaleWorkError: if it finished with another config (unless `reuse_stale`).
    """
    if not is_done(workdir):
        return False
    fingerprint.check(run_fingerprint(config), read_done(workdir).get("fingerprint"),
                      what=f"the finished run {workdir}", reuse_stale=reuse_stale)
    return True


def restore_variables(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """The final model variables (SWA average if on) of a finished run, on the host.

    A converted network (`experiments.convert_weights --output=<workdir>`) must match
    ``config.model``.
    """
    if convert.is_pretrained(workdir):
        return load_pretrained(str(workdir), like=config.model)[1]
    return restore_final_variables(config, str(workdir))


def runs_root(workdir: str | os.PathLike, configuration: str, outer: int, fold: int) -> Path:
    return Path(workdir) / "runs" / configuration / f"outer_{outer}" / f"fold_{fold}"


def train_config_of(config: ml_collections.ConfigDict, outer: int, fold: int
                    ) -> ml_collections.ConfigDict:
    """A copy of a run config set to one (outer, inner) fold."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.data.outer_fold, copy.data.fold = outer, fold
    copy.lock()
    return copy
