"""The study end to end at a tiny size: two configurations, one fold, a few steps."""

import json
import logging
import re

import numpy as np
import pytest

from experiments.configs import study as study_config
from xeno_jax.data import evaluation_batches
from xeno_jax.evaluate import ScoreTable, bootstrap_class_level
from xeno_jax.labels import SPECIES_12
from xeno_jax.study import report, runs
from xeno_jax.study.configurations import PAPER_CONFIGURATIONS, parse_configuration, run_config
from xeno_jax.study.study import SCORES_FINGERPRINT, run_configs, run_study
from xeno_jax.train.fingerprint import StaleWorkError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    config = study_config.get_config("demo,sim_tiny")
    with config.unlocked():
        config.data_dir = str(workdir / "tfds")
        config.overrides.train.epochs = 1
        config.overrides.train.epoch_size = 16  # two steps of 8 images
    path = run_study(config, workdir)
    return config, workdir, path


def _formatted_numbers(tables: dict[tuple[str, str], ScoreTable]) -> set[str]:
    """Every value the report may print, recomputed from the saved score tables."""
    numbers = set()
    for table in tables.values():
        for metric in ("dice", "nsd"):
            if metric not in table.scores:
                continue
            scores = bootstrap_class_level(table, metric)
            for values in (scores.mean, scores.ci_low, scores.ci_high):
                numbers |= {f"{v:.3f}" for v in values}
            numbers |= {f"{v:.3f}" for v in (scores.class_mean, scores.class_mean_ci_low,
                                              scores.class_mean_ci_high)}
            labels = scores.labels
            for label in labels:  # label means over subsets (kidney) via label_summary
                numbers |= {f"{v:.3f}" for v in report.label_summary(table, [label], metric)}
    for (name, test_set), table in tables.items():
        parsed = parse_configuration(name)
        baseline = tables.get((f"baseline_{parsed.target}", test_set))
        if parsed.is_projected and baseline is not None:
            xeno, base = (bootstrap_class_level(t, "dice") for t in (table, baseline))
            numbers.add(f"{abs(xeno.class_mean - base.class_mean):.3f}")
            kidney = [report.KIDNEY]
            delta = (report.label_summary(table, kidney)[0]
                     - report.label_summary(baseline, kidney)[0])
            numbers.add(f"{abs(delta):.3f}")
    return numbers


def test_report_structure_and_computed_numbers(study):
    config, workdir, path = study
    text = path.read_text()
    for heading in ("# Xeno-learning study report", "## Key results",
                    "## Xeno-learning minus baseline", "## Test set `physiological`",
                    "## Test set `malperfusion`", "## Figures"):
        assert heading in text
    for name in config.configurations:
        assert f"| {name} |" in text
    for figure in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (workdir / figure).stat().st_size > 0
    tables = {(name, test): ScoreTable.load(workdir / "scores" / name / f"{test}.npz")
              for name in config.configurations for test in config.test_sets}
    assert all(len(t) for t in tables.values())
    allowed = _formatted_numbers(tables)
    # Every decimal in the tables is one of the recomputed values.
    printed = re.findall(r"[+-]?(\d\.\d{3})", text)
    assert printed and set(printed) <= allowed, sorted(set(printed) - allowed)[:10]


def test_rerun_reuses_everything(study):
    config, workdir, path = study
    before = {p: p.stat().st_mtime_ns for p in (workdir / "runs").rglob("*") if p.is_file()}
    scores = {p: p.read_bytes() for p in (workdir / "scores").rglob("*.npz")}
    text = path.read_text()
    run_study(config, workdir)
    after = {p: p.stat().st_mtime_ns for p in (workdir / "runs").rglob("*") if p.is_file()}
    assert after == before  # no run retrained or re-checkpointed
    assert {p: p.read_bytes() for p in (workdir / "scores").rglob("*.npz")} == scores
    assert path.read_text() == text


def _files(workdir):
    return {p: p.read_bytes() for folder in ("runs", "scores")
            for p in (workdir / folder).rglob("*") if p.is_file() and p.name != ".lock"}


def test_rerun_with_a_changed_learning_rate_is_refused_unless_told(study, caplog):
    """Issue 16: never the old networks or report under a new config without a word."""
    config, workdir, path = study
    files, text = _files(workdir), path.read_text()
    changed = study_config.get_config("demo,sim_tiny")
    with changed.unlocked():
        changed.data_dir = config.data_dir
        changed.overrides.train.epochs = 1
        changed.overrides.train.epoch_size = 16
        changed.overrides.train.learning_rate = 0.01
    with pytest.raises(StaleWorkError, match=r"finished run \S+baseline_human/outer_0/fold_0 was "
                                             r"made with a different config: train\.learning_rate: "
                                             r"0\.003 -> 0\.01.*--reuse_stale"):
        run_study(changed, workdir)
    assert _files(workdir) == files and path.read_text() == text
    with caplog.at_level(logging.WARNING):
        run_study(changed, workdir, reuse_stale=True)  # told to: the old work, with a warning
    assert "train.learning_rate: 0.003 -> 0.01" in caplog.text
    assert _files(workdir) == files and path.read_text() == text


def test_score_tables_of_other_networks_are_refused(study):
    config, workdir, _ = study
    record_path = workdir / "scores" / config.configurations[0] / SCORES_FINGERPRINT
    record = record_path.read_text()
    try:
        stale = json.loads(record)
        stale["digest"] = "0" * 64
        stale["values"]["outer_0/fold_0: train.epochs"] = 7
        record_path.write_text(json.dumps(stale))
        with pytest.raises(StaleWorkError, match=r"score tables in \S+ was made with a different "
                                                 r"config: outer_0/fold_0: train\.epochs: 7 -> 1"):
            run_study(config, workdir)
        record_path.unlink()
        with pytest.raises(StaleWorkError, match="records no fingerprint"):
            run_study(config, workdir)
    finally:
        record_path.write_text(record)


def test_finished_runs_and_banks_are_where_the_study_says(study):
    config, workdir, _ = study
    for name in config.configurations:
        assert runs.is_done(runs.runs_root(workdir, name, 0, 0))
    bank = runs.bank_path(config.data_dir, config.dataset, "malperfusion", "pig")
    assert bank.exists()


@pytest.mark.parametrize("name", PAPER_CONFIGURATIONS)
def test_every_paper_configuration_has_a_valid_config(name):
    config = run_config(name, quick=True)
    parsed = parse_configuration(name)
    assert config.data.species == parsed.target
    assert (config.augment.preset == "xeno") == parsed.is_projected
    if parsed.is_projected:
        assert (parsed.pathology, parsed.source) in runs.BANK_RECIPES
    with pytest.raises(AttributeError):
        config.train.bach_size = 4  # locked: misspelt keys are errors


def test_overrides_reach_every_run_and_unset_ones_keep_the_configuration():
    config = study_config.get_config("demo,sim_tiny")
    with config.unlocked():
        config.overrides.train.epochs = 3
        config.overrides.model.dtype = "bfloat16"
    plain = run_config("baseline_human", quick=True, dataset="sim_tiny")
    for _, _, run in run_configs(config, "baseline_human"):
        assert run.train.epochs == 3 and run.model.dtype == "bfloat16"
        assert run.train.batch_size == plain.train.batch_size


def test_unknown_configuration_is_an_error():
    with pytest.raises(ValueError, match="unknown configuration 'baseline-human'"):
        parse_configuration("baseline-human")
    assert np.isnan(report.label_summary(
        ScoreTable(np.array(["a"]), np.array(["s"]), np.array([0]), {"dice": np.array([1.0])}),
        [report.KIDNEY])[0])


def test_a_tiny_model_learns_and_beats_the_majority_class(study):
    """The quick model on simulated human images: loss falls; held-out pixels beat majority."""
    config, workdir, _ = study
    run = runs.train_config_of(run_config("baseline_human", quick=True, dataset=config.dataset),
                               outer=0, fold=0)
    with run.unlocked():
        run.data.data_dir = config.data_dir
        run.train.epochs, run.train.epoch_size = 4, 320  # 160 steps of 8 images
        run.train.log_every_steps = 10
    directory = workdir / "learning"
    runs.train_run(run, directory)
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses

    catalog = runs.catalog_for(["human"], config.dataset, config.data_dir)
    train_records, _ = runs.training_images(run, catalog)
    test_records = catalog.select(
        runs.nested_specs(catalog, "human", config.data_dir, config.dataset)[0].folds[0].test)
    assert not {r.subject for r in train_records} & {r.subject for r in test_records}
    classes = SPECIES_12.num_classes
    train_counts = np.zeros(classes, np.int64)
    for records, batch in evaluation_batches(catalog, train_records, 8):
        labels, valid = batch["labels"][:len(records)], batch["valid"][:len(records)]
        train_counts += np.bincount(labels[valid], minlength=classes)[:classes]
    majority = int(np.argmax(train_counts))
    predict = runs.predictor([(run, runs.restore_variables(run, directory))])
    correct = majority_correct = total = 0
    for records, batch in evaluation_batches(catalog, test_records, 8):
        n = len(records)
        valid, labels = batch["valid"][:n], batch["labels"][:n]
        prediction = np.argmax(predict(batch["features"])[:n], axis=-1)
        correct += np.sum((prediction == labels) & valid)
        majority_correct += np.sum((labels == majority) & valid)
        total += np.sum(valid)
    accuracy, majority_accuracy = correct / total, majority_correct / total
    assert accuracy > majority_accuracy + 0.2, (accuracy, majority_accuracy)
