"""The xeno-learning study: build, learn projections, train, evaluate, report.

``run_study(config, workdir)`` walks through the stages below and skips what already exists, so
an interrupted study resumes where it stopped and a repeated one reuses everything:

1. datasets of every species involved (built when missing);
2. projection banks of the projected configurations (method.md A2);
3. the training runs: configurations x outer folds x inner folds (nested cross-validation,
   method.md A8), each in ``<workdir>/runs/<configuration>/outer_<i>/fold_<k>``, trained here,
   by local worker processes or by cluster jobs (`xeno_jax.study.launch`);
4. evaluation (method.md C3): each test set scored with its fold ensemble into
   ``<workdir>/scores/<configuration>/<test set>.npz``;
5. the report ``<workdir>/report.md`` with its tables and figures.

Reuse is checked, never assumed: a finished run is reused only if its ``done.json`` holds the
fingerprint of the run's current config (`xeno_jax.train.fingerprint`), and a configuration's
score tables only if ``scores/<configuration>/fingerprint.json`` holds the fingerprints of the
networks that are scored now. Anything else is a `StaleWorkError` naming the keys that differ,
unless the study runs with ``reuse_stale``.

Any number of study processes may run on one work directory (`xeno_jax.study.workdir`): each
dataset, bank and run is made by one of them (a run is claimed; its training locks the run's
directory), and one at a time scores and reports.

Test sets of a configuration with target species T:

- ``physiological``: T's outer test sets, each with the ensemble of that outer fold's models;
- ``cross_species``: every other species' physiological images, ensemble of all T's models;
- ``malperfusion`` / ``icg``: T's malperfused (e.g. kidney) or ICG images, all models.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from data_builders import SPECIES
from xeno_jax.data import Catalog, Record
from xeno_jax.evaluate import ScoreTable
from xeno_jax.io import atomic_write
from xeno_jax.labels import SPECIES_12
from xeno_jax.spectra import sto2
from xeno_jax.study import banks, datasets, evaluation, launch, runs
from xeno_jax.study.configurations import Configuration, parse_configuration
from xeno_jax.study.report import Evaluation, write_report
from xeno_jax.study.workdir import exclusive
from xeno_jax.train import fingerprint

SCORES_FINGERPRINT = "fingerprint.json"
SCORES_VERSION = 2  # of the score tables' columns; 2: the full-label scores
TEST_SETS = ("physiological", "cross_species", "malperfusion", "icg")
REPORT_LOCK = "report.lock"


def species_involved(configurations: Sequence[str], test_sets: Sequence[str]) -> list[str]:
    needed = set()
    for name in configurations:
        parsed = parse_configuration(name)
        needed |= {parsed.target, *parsed.extra_species}
        if parsed.source:
            needed.add(parsed.source)
    if "cross_species" in test_sets:
        needed |= set(SPECIES)
    return sorted(needed)


def scores_fingerprint(workdir: Path, configuration: str,
                       trained: Sequence[tuple[int, int, ml_collections.ConfigDict]],
                       rule: dict | None = None, test_dataset: str = ""
                       ) -> fingerprint.Fingerprint:
    """The fingerprints (from ``done.json``) of the networks that score a configuration, the
    rule's threshold if it has one, the test sets' dataset if it is not the networks', and the
    version of the score tables."""
    values = {"scores_version": SCORES_VERSION}
    if test_dataset:
        values["test_dataset"] = test_dataset
    if rule is not None:
        values["rule_threshold"] = rule["threshold"]
    trained_as = parse_configuration(configuration).trained_as
    for outer, fold, _ in trained:
        done = runs.read_done(runs.runs_root(workdir, trained_as, outer, fold))
        stored = (done.get("fingerprint") or {}).get("values", {})
        values.update({f"outer_{outer}/fold_{fold}: {k}": v for k, v in stored.items()})
    return fingerprint.Fingerprint(values)


def tested_dataset(config: ml_collections.ConfigDict) -> str:
    """The dataset of the test sets: ``config.test_dataset``, else ``config.dataset``."""
    return config.get("test_dataset") or config.dataset


def configuration_rule(parsed: Configuration, dataset: str, data_dir: str | os.PathLike
                       ) -> dict | None:
    """The rule's threshold record (`banks.ensure_rule_threshold`), None if not a rule."""
    if not parsed.is_rule:
        return None
    return banks.ensure_rule_threshold(parsed.pathology, parsed.source, dataset, data_dir)


def evaluate_configuration(config: ml_collections.ConfigDict, configuration: str,
                           workdir: Path, *, reuse_stale: bool = False) -> list[Evaluation]:
    """Scores a configuration on its test sets (cached in ``<workdir>/scores``): with each
    outer fold's ensemble, and with every network alone if ``config.network_scores`` (not on
    ``cross_species``).

    Raises:
      StaleWorkError: if cached tables were made with other networks (unless `reuse_stale`).
    """
    parsed = parse_configuration(configuration)
    trained = launch.run_configs(config, configuration)
    rule = configuration_rule(parsed, config.dataset, config.data_dir)
    folder = workdir / "scores" / configuration
    record = scores_fingerprint(workdir, configuration, trained, rule,
                                config.get("test_dataset", ""))
    stored = folder / SCORES_FINGERPRINT
    if any(folder.glob("**/*.npz")):
        fingerprint.check(record, fingerprint.read_record(stored),
                          what=f"the score tables in {folder}", reuse_stale=reuse_stale)
    else:  # the record describes the networks of every table the folder will hold
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(stored, text=True) as f:
            json.dump(record.to_json(), f)
    restored = []

    def models():  # restored lazily: nothing to do when every table exists
        if not restored:
            restored.extend((outer, fold, run, runs.restore_variables(
                run, runs.runs_root(workdir, parsed.trained_as, outer, fold)))
                for outer, fold, run in trained)
        return restored

    groups = [("", folder, lambda: [(o, r, v) for o, _, r, v in models()])]
    if config.get("network_scores", False):
        groups += [(f"outer_{outer}/fold_{fold}",
                    folder / "networks" / f"outer_{outer}_fold_{fold}",
                    lambda outer=outer, fold=fold: [(o, r, v) for o, f, r, v in models()
                                                    if (o, f) == (outer, fold)])
                   for outer, fold, _ in trained]
    results = []
    for network, where, chosen in groups:
        # Single networks only for the across-networks table, which reads no cross_species.
        for test_set in [t for t in config.test_sets if not network or t != "cross_species"]:
            path = where / f"{test_set}.npz"
            if path.exists():
                results.append(Evaluation(configuration, test_set, ScoreTable.load(path),
                                          network))
                continue
            table = score_test_set(parsed, test_set, chosen(), dataset=tested_dataset(config),
                                   data_dir=config.data_dir,
                                   batch_size=config.evaluate_batch_size,
                                   examples=None if network else folder, rule=rule)
            if table is None:
                continue
            where.mkdir(parents=True, exist_ok=True)
            table.save(path)
            results.append(Evaluation(configuration, test_set, table, network))
    return results


def with_rule(predict, rule: dict):
    """`predict` with every pixel whose StO2 index (`xeno_jax.spectra.sto2`) lies below the
    rule's threshold set to the rule's organ (probability 1)."""
    organ = np.eye(SPECIES_12.num_classes, dtype=np.float32)[
        SPECIES_12.name_to_index(rule["organ"])]

    def relabelled(features):
        probabilities = np.asarray(predict(features))
        below = np.asarray(sto2(features)) < rule["threshold"]
        return np.where(below[..., None], organ, probabilities)

    return relabelled


def test_images(parsed: Configuration, test_set: str, *, dataset: str,
                data_dir: str | os.PathLike, outer_specs: dict[int, str] | None = None
                ) -> list[tuple[int | None, Catalog, list[Record]]]:
    """The images a configuration is scored on in one test set.

    Subjects a projection bank of their species learns from (`banks.held_out_subjects`) are
    left out of every test set, whichever configuration is scored.

    Args:
      parsed: the configuration.
      test_set: one of `TEST_SETS`.
      dataset, data_dir: the builder config and TFDS directory.
      outer_specs: ``{outer fold: data spec}`` (`datasets.ensure_outer_spec`'s `spec`) of the
        physiological test set's outer folds.

    Returns:
      ``(outer fold, catalog, images)`` groups: one per outer fold for ``physiological`` (its
      networks score it), else one with outer fold None (every network scores it); no group if
      the species has no such images.
    """
    def tested(species, splits=None):
        catalog = datasets.ensure_catalog(species, dataset, data_dir, splits)
        held_out = set().union(*(banks.held_out_subjects(catalog, s) for s in species))
        return catalog, lambda images: [r for r in images if r.subject not in held_out]

    if test_set == "physiological":
        catalog, keep = tested([parsed.target])
        groups = []
        for outer, spec in sorted((outer_specs or {0: ""}).items()):
            spec = datasets.ensure_outer_spec(catalog, parsed.target, outer, data_dir, dataset,
                                              spec)
            groups.append((outer, catalog, keep(catalog.select(spec.folds[0].test))))
        return groups
    if test_set == "cross_species":
        others = [s for s in SPECIES if s not in (parsed.target, *parsed.extra_species)]
        catalog, keep = tested(others)
        return [(None, catalog,
                 keep([r for s in others for r in datasets.semantic_images(catalog, s)]))]
    if test_set in ("malperfusion", "icg"):
        catalog, keep = tested([parsed.target])
        images = keep(catalog.filter(perfusion_state=test_set))
        return [(None, catalog, images)] if images else []
    raise ValueError(f"unknown test set {test_set!r}; known: {TEST_SETS}")


def score_test_set(parsed: Configuration, test_set: str, models, *, dataset: str,
                   data_dir: str | os.PathLike, batch_size: int,
                   examples: Path | None = None, rule: dict | None = None
                   ) -> ScoreTable | None:
    """One test set's scores (its images: `test_images`), or None if the target species has
    no such images.

    Args:
      parsed: the configuration whose models are scored.
      test_set: one of `TEST_SETS`.
      models: ``(outer fold, run config, variables)`` of every trained run.
      dataset, data_dir: the builder config and TFDS directory.
      batch_size: images per evaluation batch.
      examples: folder for ``examples_<test set>.npz`` with a few predictions (None: none).
      rule: a rule's threshold record (`configuration_rule`): the models' predictions are
        relabelled by it (`with_rule`).
    """
    outer_specs = {}
    for outer, run, _ in models:  # each outer fold's data spec: run.data.spec
        outer_specs.setdefault(outer, run.data.get("spec", ""))
    groups = test_images(parsed, test_set, dataset=dataset, data_dir=data_dir,
                         outer_specs=outer_specs)
    if not groups:
        return None
    # Pathology tables (C1): DSC only, as the reference's perfusion and ICG scripts.
    metrics = ("dice", "nsd") if test_set in ("physiological", "cross_species") else ("dice",)
    tables = []
    for k, (outer, catalog, images) in enumerate(groups):
        predict = evaluation.predictor([(run, v) for o, run, v in models
                                        if outer is None or o == outer])
        if rule is not None:
            predict = with_rule(predict, rule)
        tables.append(evaluation.score_images(catalog, images, predict, batch_size,
                                              metrics=metrics))
        if examples is not None and k == 0 and test_set != "cross_species":
            evaluation.save_examples(examples / f"examples_{test_set}.npz", catalog, images,
                                     predict)
    return ScoreTable.concatenate(tables)


def run_study(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              launcher: str = "local", run: str | None = None,
              reuse_stale: bool = False) -> Path | None:
    """Runs (or resumes) the study and writes its report.

    Args:
      config: the study config (``experiments/configs/study.py``).
      workdir: the study's work directory; any number of study processes may share it.
      launcher: where the runs train (`xeno_jax.study.launch`).
      run: train only this run (``<configuration>/outer_<i>/fold_<k>``), then evaluate and
        report if it was the last one missing.
      reuse_stale: reuse finished runs and score tables made with another config (logged as a
        warning) instead of refusing them.

    Returns:
      The report's path, or None when `run` left other runs to train.

    Raises:
      StaleWorkError: naming the keys that differ, for work made with another config.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    unknown = set(config.test_sets) - set(TEST_SETS)
    if unknown:
        raise ValueError(f"config.test_sets: unknown {sorted(unknown)}; known: {TEST_SETS}")
    if run is not None:  # one run of a scheduler's array: it finds or makes what it needs
        launch.train_runs(config, workdir, [launch.RunKey.parse(run)], reuse_stale=reuse_stale)
        left = launch.pending_runs(config, workdir, reuse_stale=reuse_stale)
        if left:
            logging.info("%s done; %d runs left before evaluation", run, len(left))
            return None
    else:
        logging.info("stage 1/5: datasets")
        for species in species_involved(config.configurations, config.test_sets):
            datasets.ensure_dataset(species, config.dataset, config.data_dir)
        logging.info("stage 2/5: projection banks")
        for name in config.configurations:
            parsed = parse_configuration(name)
            if parsed.is_projected:
                oracle = parsed.source == parsed.target
                banks.ensure_bank(parsed.pathology, parsed.source,
                                  tested_dataset(config) if oracle else config.dataset,
                                  config.data_dir)
            configuration_rule(parsed, config.dataset, config.data_dir)
        logging.info("stage 3/5: training")
        launch.launch(config, workdir, launcher, reuse_stale=reuse_stale)
    with exclusive(workdir / REPORT_LOCK):  # one process scores; the others then reuse
        logging.info("stage 4/5: evaluation")
        evaluations = [e for name in config.configurations
                       for e in evaluate_configuration(config, name, workdir,
                                                       reuse_stale=reuse_stale)]
        logging.info("stage 5/5: report")
        return write_report(config, workdir, evaluations)
