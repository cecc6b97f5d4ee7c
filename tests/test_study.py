"""The study end to end at a tiny size: two configurations, two folds, a few steps; the same
study by two processes sharing a work directory; a killed worker's run taken over."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from experiments.configs import study as study_config
from experiments.configs.run import get_config as run_config
from xeno_jax.data import evaluation_batches
from xeno_jax.evaluate import FULL_LABEL_METRICS, ScoreTable, bootstrap_class_level
from xeno_jax.labels import SPECIES_12
from xeno_jax.projections import ProjectionBank
from xeno_jax.spectra import sto2
from xeno_jax.study import banks, datasets, evaluation, launch, report, runs, sweeps
from xeno_jax.study import study as study_module
from xeno_jax.study.configurations import PAPER_CONFIGURATIONS, parse_configuration
from xeno_jax.study.study import SCORES_FINGERPRINT, TEST_SETS, run_study
from xeno_jax.study.workdir import is_claimed
from xeno_jax.train.fingerprint import StaleWorkError

pytestmark = pytest.mark.slow
# Tests that use the `study` fixture run on one xdist worker, so it is made once.
SHARES_STUDY = pytest.mark.xdist_group("study")
REPOSITORY = Path(__file__).resolve().parents[1]
# The `study` fixture: the demo's transfer, baseline and rule (the random control trains like
# the transfer; tests below check its maps), each network scored alone too.
STUDY_CONFIGURATIONS = ("baseline_human", "projected-malperfusion_pig2human",
                        "rule-malperfusion_pig2human")
# The `study` fixture's runs as flags of `python -m experiments.study` (its trained
# configurations, ensembles only).
STUDY_FLAGS = ("--config=experiments/configs/study.py:demo,sim_tiny", "--config.folds=(0,1)",
               f"--config.configurations={STUDY_CONFIGURATIONS[:2]}",
               "--config.overrides.train.epochs=1", "--config.overrides.train.epoch_size=16")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    config = study_config.get_config("demo,sim_tiny")
    with config.unlocked():
        config.data_dir = str(workdir / "tfds")
        config.configurations = STUDY_CONFIGURATIONS
        config.network_scores = True
        config.folds = (0, 1)
        config.overrides.train.epochs = 1
        config.overrides.train.epoch_size = 16  # two steps of 8 images
    path = run_study(config, workdir)
    return config, workdir, path


def _study_process(flags, log: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.study", *flags], cwd=REPOSITORY,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, **kwargs)


def _markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every table of a report by its heading (``<heading> DSC`` / ``NSD`` for test sets)."""
    tables, heading, lines, i = {}, "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line in ("DSC:", "NSD:"):
            heading = f"{heading.split(' (')[0]} ({line[:-1]})"
        elif line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")),
                                     strict=True)))
                i += 1
            assert heading not in tables, f"two tables under {heading!r}"
            tables[heading] = rows
            continue
        i += 1
    return tables


def _summary(table: ScoreTable, organs, metric: str) -> tuple[float, float, float]:
    """Class-level mean over `organs` and its subject-bootstrap interval, recomputed."""
    scores = bootstrap_class_level(table, metric)
    rows = np.flatnonzero(np.isin(scores.labels, [SPECIES_12.name_to_index(n) for n in organs]))
    samples = np.nanmean(scores.bootstrap_means[:, rows], axis=1)
    return (float(np.mean(scores.mean[rows])), float(np.nanpercentile(samples, 2.5)),
            float(np.nanpercentile(samples, 97.5)))


def _interval(mean, low, high) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if np.isfinite(mean) else "n/a"


# The key table's columns as the report must compute them: (test set, organs, metric).
KEY_COLUMNS = {
    "kidney DSC, physiological": ("physiological", ("kidney",), "dice"),
    "kidney DSC, malperfused": ("malperfusion", ("kidney",), "dice"),
    "kidney DSC, malperfused, full labels": ("malperfusion", ("kidney",), "full_dice"),
    "kidney precision, malperfused, full labels": ("malperfusion", ("kidney",),
                                                   "full_precision"),
    "other tissue called kidney, physiological": ("physiological", ("kidney",),
                                                  "full_false_share"),
}
FULL_COLUMNS = {"DSC, annotation": "dice", "DSC, full labels": "full_dice",
                "precision": "full_precision", "recall": "full_recall",
                "other tissue called the organ": "full_false_share"}


def _check_rows(printed: list[dict[str, str]], expected: dict[tuple, dict[str, str]],
                keys: tuple[str, ...], what: str) -> None:
    """Every printed row is an expected one, cell by cell (each expected cell printed)."""
    assert len(printed) == len(expected), (what, printed)
    for row in printed:
        key = tuple(row[k] for k in keys)
        assert key in expected, (what, key)
        for column, value in expected[key].items():
            assert row.get(column) == value, (what, key, column, row.get(column), value)


@SHARES_STUDY
def test_report_structure_and_computed_numbers(study):
    """Every table of the report, cell by cell (sign, column and row), against values
    recomputed here from the saved score tables."""
    config, workdir, path = study
    text = path.read_text()
    for heading in ("# Xeno-learning study report", "## Key results",
                    "## Xeno-learning minus its controls", "## Across networks",
                    "## Transfers and controls minus baseline", "## Full labels",
                    "## Test set `physiological`", "## Test set `malperfusion`", "## Figures"):
        assert heading in text
    for figure in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (workdir / figure).stat().st_size > 0
    names = config.configurations
    tables = {(name, test): ScoreTable.load(workdir / "scores" / name / f"{test}.npz")
              for name in names for test in config.test_sets}
    assert all(len(t) for t in tables.values())
    printed = _markdown_tables(text)

    key = {}
    for name in names:
        row = {"role": parse_configuration(name).role}
        for column, (test_set, organs, metric) in KEY_COLUMNS.items():
            row[column] = _interval(*_summary(tables[name, test_set], organs, metric))
        scores = bootstrap_class_level(tables[name, "physiological"], "dice")
        row["class-mean DSC, physiological"] = _interval(
            scores.class_mean, scores.class_mean_ci_low, scores.class_mean_ci_high)
        key[name,] = row
    _check_rows(printed["Key results"], key, ("configuration",), "key results")

    def mean(name, test_set, organs, metric):
        return _summary(tables[name, test_set], organs, metric)[0]

    xeno = "projected-malperfusion_pig2human"
    controls = {}
    for control in ("baseline_human", "rule-malperfusion_pig2human"):
        controls[xeno, control] = {
            column: f"{mean(xeno, *spec) - mean(control, *spec):+.3f}"
            for column, spec in KEY_COLUMNS.items()
            if np.isfinite(mean(xeno, *spec) - mean(control, *spec))}
    _check_rows(printed["Xeno-learning minus its controls"], controls,
                ("configuration", "minus"), "controls")

    across = {}
    for name in names:
        networks = sorted((workdir / "scores" / name / "networks").iterdir())
        assert [n.name for n in networks] == ["outer_0_fold_0", "outer_0_fold_1"]
        row = {"networks": "2"}
        for column, (test_set, organs, metric) in KEY_COLUMNS.items():
            values = np.array([_summary(ScoreTable.load(n / f"{test_set}.npz"), organs,
                                        metric)[0] for n in networks])
            if np.isfinite(values).any():
                row[column] = _interval(np.nanmean(values), np.nanmin(values),
                                        np.nanmax(values))
        values = [bootstrap_class_level(ScoreTable.load(n / "physiological.npz")).class_mean
                  for n in networks]
        row["class-mean DSC, physiological"] = _interval(np.mean(values), np.min(values),
                                                         np.max(values))
        across[name,] = row
    _check_rows(printed["Across networks"], across, ("configuration",), "across networks")

    differences = {}
    for name in names[1:]:
        for test_set in config.test_sets:
            a, b = tables[name, test_set], tables["baseline_human", test_set]
            class_mean = (bootstrap_class_level(a).class_mean
                          - bootstrap_class_level(b).class_mean)
            kidney = (mean(name, test_set, ("kidney",), "dice")
                      - mean("baseline_human", test_set, ("kidney",), "dice"))
            differences[name, test_set] = {"delta class-mean DSC": f"{class_mean:+.3f}",
                                           "delta DSC of malperfusion labels": f"{kidney:+.3f}"}
    _check_rows(printed["Transfers and controls minus baseline"], differences,
                ("configuration", "test set"), "differences")

    full = {(name, test_set): {column: _interval(*_summary(tables[name, test_set], ("kidney",),
                                                           metric))
                               for column, metric in FULL_COLUMNS.items()}
            for name in names for test_set in config.test_sets}
    _check_rows(printed["Full labels"], full, ("configuration", "test set"), "full labels")

    for test_set in config.test_sets:
        for metric, title in (("dice", "DSC"), ("nsd", "NSD")):
            heading = f"Test set `{test_set}` ({title})"
            if metric not in tables[names[0], test_set].scores:
                assert heading not in printed
                continue
            expected = {}
            for name in names:
                scores = bootstrap_class_level(tables[name, test_set], metric)
                row = {"class mean": _interval(scores.class_mean, scores.class_mean_ci_low,
                                               scores.class_mean_ci_high)}
                for k, label in enumerate(scores.labels):
                    row[SPECIES_12.index_to_name(label)] = _interval(
                        scores.mean[k], scores.ci_low[k], scores.ci_high[k])
                expected[name,] = row
            _check_rows(printed[heading], expected, ("configuration",), heading)
    checked = {"Key results", "Xeno-learning minus its controls", "Across networks",
               "Transfers and controls minus baseline", "Full labels"}
    assert set(printed) - checked == {h for h in printed if h.startswith("Test set")}


@SHARES_STUDY
def test_kidney_everywhere_scores_perfect_polygon_dsc_but_low_full_label_precision(study):
    """On the simulated malperfused human images, a "network" that calls every pixel kidney
    scores DSC 1 inside the polygon annotations; the report's full-label table shows both."""
    config, _, _ = study
    catalog = datasets.ensure_catalog(["human"], config.dataset, config.data_dir,
                                      ("malperfusion",))
    images = catalog.filter(perfusion_state="malperfusion")
    assert images

    def kidney_everywhere(features):
        return np.broadcast_to(np.eye(SPECIES_12.num_classes)[report.KIDNEY],
                               (*features.shape[:3], SPECIES_12.num_classes))

    table = evaluation.score_images(catalog, images, kidney_everywhere, 8)
    polygon, full_dice, precision, recall, false_share = (
        report.label_summary(table, [report.KIDNEY], m)[0]
        for m in ("dice", *FULL_LABEL_METRICS))
    assert polygon == 1.0 and recall == 1.0 and false_share == 1.0
    assert precision < 0.3 and full_dice < 0.5, (precision, full_dice)
    (row,) = report.full_label_rows([report.Evaluation("kidney_everywhere", "malperfusion",
                                                       table)])
    assert row["DSC, annotation"].startswith("1.000 ")
    assert row["precision"].startswith(f"{precision:.3f} ")


@SHARES_STUDY
def test_random_maps_keep_each_labels_sizes_of_maps_in_random_directions(study):
    """The random control's bank: label by label, the learnt bank's ||W - I|| and ||b|| (so
    their distribution), in directions unrelated to the learnt maps'; it is what a
    ``projected-random`` run trains with."""
    config, _, _ = study
    learned = ProjectionBank.load(banks.bank_path(config.data_dir, config.dataset,
                                                  "malperfusion", "pig"))
    control = banks.random_maps(learned)
    assert (control.label_indices, control.counts) == (learned.label_indices, learned.counts)
    eye = np.eye(learned.num_channels)
    for label in learned.label_indices:
        (w, b), (rw, rb) = learned.pairs(label), control.pairs(label)
        np.testing.assert_allclose(np.linalg.norm(rw - eye, axis=(1, 2)),
                                   np.linalg.norm(w - eye, axis=(1, 2)), rtol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(rb, axis=1), np.linalg.norm(b, axis=1),
                                   rtol=1e-4)
        flat, random_flat = (w - eye).reshape(len(w), -1), (rw - eye).reshape(len(w), -1)
        cosines = np.sum(flat * random_flat, 1) / (np.linalg.norm(flat, axis=1)
                                                   * np.linalg.norm(random_flat, axis=1))
        assert np.all(np.abs(cosines) < 0.1), cosines
        assert not np.allclose(rb, b)
    run = run_config("projected-random-malperfusion_pig2human,quick,sim_tiny")
    run.data.data_dir = config.data_dir
    np.testing.assert_array_equal(banks.ensure_run_bank(run).weights, control.weights)
    run.augment.maps = "learnt"
    with pytest.raises(ValueError, match=r"config\.augment\.maps='learnt': expected 'learned'"):
        banks.ensure_run_bank(run)


@SHARES_STUDY
def test_the_rules_threshold_comes_from_the_source_species_bank_images_only(study):
    config, _, _ = study
    rule = study_module.configuration_rule(parse_configuration("rule-malperfusion_pig2human"),
                                           config.dataset, config.data_dir)
    catalog = datasets.ensure_catalog(["pig", "human"], config.dataset, config.data_dir, None)
    healthy, sick = banks.recipe_images(banks.BANK_RECIPES["malperfusion", "pig"], catalog,
                                        "pig")
    assert sorted(rule["images"]) == sorted(r.image_name for r in (*healthy, *sick))
    assert {r.species for r in catalog.select(rule["images"])} == {"pig"}
    assert rule["true_positive_rate"] - rule["false_positive_rate"] > 0.3, rule
    # The same for any target; recomputed, the same threshold.
    assert study_module.configuration_rule(parse_configuration("rule-malperfusion_pig2rat"),
                                           config.dataset, config.data_dir) == rule
    assert banks.rule_threshold("malperfusion", "pig", config.dataset,
                                config.data_dir)["threshold"] == rule["threshold"]
    # The rule relabels exactly the pixels below the threshold as kidney.
    images = catalog.filter(species="human", perfusion_state="malperfusion")[:4]
    _, batch = next(iter(evaluation_batches(catalog, images, 4)))
    features = batch["features"]
    background = np.zeros((*features.shape[:3], SPECIES_12.num_classes), np.float32)
    background[..., 0] = 1
    relabelled = study_module.with_rule(lambda f: background, rule)(features)
    below = np.asarray(sto2(features)) < rule["threshold"]
    assert below.any() and (~below).any()
    np.testing.assert_array_equal(np.argmax(relabelled, -1),
                                  np.where(below, report.KIDNEY, 0))


@SHARES_STUDY
def test_no_bank_shares_a_subject_with_a_test_set_it_is_scored_on(study):
    """For every transfer and control: the subjects of the images its bank (or rule) learns
    from are in none of the target's test sets, the other species' included; without the
    held-out subjects they would be (e.g. the pig kidney pigs in the pig malperfusion set)."""
    config, _, _ = study
    data_dir, dataset = config.data_dir, config.dataset
    leaks, unlearnable = [], set()
    for name in (*PAPER_CONFIGURATIONS, *study_config.CONTROLS):
        parsed = parse_configuration(name)
        if not parsed.source:
            continue
        catalog = datasets.ensure_catalog([parsed.source], dataset, data_dir, None)
        recipe = banks.BANK_RECIPES[parsed.pathology, parsed.source]
        learnt_from = {r.subject for images in banks.recipe_images(recipe, catalog,
                                                                   parsed.source)
                       for r in images}
        try:
            bank = ProjectionBank.load(banks.ensure_bank(parsed.pathology, parsed.source,
                                                         dataset, data_dir))
            pairs = sorted({n for pair in bank.pair_names for n in pair})
            assert {r.subject for r in catalog.select(pairs)} <= learnt_from
        except ValueError as e:  # sim_tiny: one image per subject, not always the organ's
            assert "none of the labels" in str(e)
            unlearnable.add((parsed.pathology, parsed.source))
        for test_set in TEST_SETS:
            for _, _, images in study_module.test_images(
                    parsed, test_set, dataset=dataset, data_dir=data_dir,
                    outer_specs={0: "", 1: "", 2: ""}):
                tested = {r.subject for r in images}
                assert not learnt_from & tested, (name, test_set, learnt_from & tested)
        every = catalog.filter(perfusion_state="malperfusion" if parsed.pathology
                               == "malperfusion" else "icg")
        leaks.append(bool(learnt_from & {r.subject for r in every}))
    assert all(leaks)
    assert unlearnable <= {("malperfusion", "rat")}, unlearnable


@SHARES_STUDY
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


@SHARES_STUDY
def test_rerun_with_a_changed_learning_rate_is_refused_unless_told(study, caplog):
    """Issue 16: never the old networks or report under a new config without a word."""
    config, workdir, path = study
    files, text = _files(workdir), path.read_text()
    changed = study_config.get_config("demo,sim_tiny")
    with changed.unlocked():
        changed.data_dir = config.data_dir
        changed.configurations = config.configurations
        changed.network_scores = True
        changed.folds = config.folds
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


@SHARES_STUDY
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


@SHARES_STUDY
def test_finished_runs_and_banks_are_where_the_study_says(study):
    config, workdir, _ = study
    for key in launch.study_runs(config):
        assert runs.is_done(key.directory(workdir))
        assert not is_claimed(key.directory(workdir))
    bank = banks.bank_path(config.data_dir, config.dataset, "malperfusion", "pig")
    assert bank.exists()


@pytest.mark.parametrize("name", dict.fromkeys(
    (*PAPER_CONFIGURATIONS, *study_config.get_config("controls_all").configurations)))
def test_every_configuration_has_a_valid_config(name):
    parsed = parse_configuration(name)
    if parsed.is_rule:  # no network of its own: the baseline's
        assert parsed.trained_as == f"baseline_{parsed.target}"
        with pytest.raises(ValueError, match="trains no network"):
            run_config(f"{name},quick")
        return
    config = run_config(f"{name},quick")
    assert config.data.species == parsed.target
    assert ("projection" in config.augment.steps) == parsed.is_projected
    assert config.augment.maps == ("random" if parsed.control == "random" else "learned")
    if parsed.is_projected:
        assert (parsed.pathology, parsed.source) in banks.BANK_RECIPES
        assert (parsed.pathology, parsed.target) in banks.BANK_RECIPES  # its oracle's
    with pytest.raises(AttributeError):
        config.train.bach_size = 4  # locked: misspelt keys are errors


def test_configuration_names_and_roles():
    roles = {"baseline_human": "baseline", "projected-malperfusion_pig2human": "xeno-learning",
             "projected-random-malperfusion_pig2human": "random maps",
             "rule-malperfusion_pig2human": "rule",
             "projected-malperfusion_human2human": "oracle",
             "projected-random-ICG_rat2pig": "random maps",
             "joint_pig-p+rat-p2human": "joint"}
    assert {n: parse_configuration(n).role for n in roles} == roles
    with pytest.raises(ValueError, match="unknown configuration 'rule-ICG_rat2pig'"):
        parse_configuration("rule-ICG_rat2pig")  # the rule relabels one organ
    assert study_config.controls_of("projected-ICG_rat2pig") == (
        "baseline_pig", "projected-ICG_rat2pig", "projected-random-ICG_rat2pig",
        "projected-ICG_pig2pig")


def test_cross_species_rows_are_each_baselines_relative_change_per_species():
    def table(subjects, values):
        n = len(values)
        return ScoreTable(np.array([f"{s}#{i}" for i, s in enumerate(subjects)]),
                          np.array(subjects), np.zeros(n, int), {"dice": np.array(values)})

    own = table(["SPACE_1", "SPACE_2"], [0.8, 0.8])
    other = table(["P1", "P2", "R1"], [0.4, 0.6, 0.2])
    evaluations = [report.Evaluation("baseline_human", "physiological", own),
                   report.Evaluation("baseline_human", "cross_species", other),
                   report.Evaluation("projected-malperfusion_pig2human", "cross_species", other)]
    species = {"P1": "pig", "P2": "pig", "R1": "rat"}
    (row,) = report.cross_species_rows(evaluations, species)
    assert list(row.items()) == [
        ("configuration", "baseline_human"), ("class-mean DSC, human", "0.800"),
        ("relative change, human", "n/a"), ("class-mean DSC, pig", "0.500"),
        ("relative change, pig", "-0.375"), ("class-mean DSC, rat", "0.200"),
        ("relative change, rat", "-0.750")]


def test_overrides_reach_every_run_and_unset_ones_keep_the_configuration():
    config = study_config.get_config("demo,sim_tiny")
    with config.unlocked():
        config.overrides.train.epochs = 3
        config.overrides.model.dtype = "bfloat16"
    plain = run_config("baseline_human,quick,sim_tiny")
    for _, _, run in launch.run_configs(config, "baseline_human"):
        assert run.train.epochs == 3 and run.model.dtype == "bfloat16"
        assert run.train.batch_size == plain.train.batch_size


def _flag_values(config_file: str, *args):
    argv = ["prog", f"--config={config_file}", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def _changed(value):
    """A value of the same type that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return type(value)(value * 0.5 + 1)
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, tuple):
        return tuple(_changed(v) for v in value) if value else (1,)
    raise TypeError(value)


def test_every_augmentation_value_is_a_flag_of_a_run_and_of_the_study():
    """Each value of the paper's augmentation recipe (run.py) set from the command line, on a
    single run and through the study's overrides; a misspelt key names itself."""
    recipe = run_config("projected-malperfusion_pig2human,quick")
    leaves = {f"{step}.{key}": value for step in recipe.augment.steps
              for key, value in recipe.augment[step].items()}
    leaves["steps"] = recipe.augment.steps
    assert len(leaves) > 12, leaves
    as_flag = lambda v: repr(v) if isinstance(v, tuple) else str(v)
    run_flags = [f"--config.augment.{k}={as_flag(_changed(v))}" for k, v in leaves.items()
                 if k != "steps"] + ["--config.augment.steps=('projection','l1_normalize')"]
    single = _flag_values(
        "experiments/configs/run.py:projected-malperfusion_pig2human,quick", *run_flags)
    study_flags = [f.replace("--config.augment.", "--config.overrides.augment.")
                   for f in run_flags]
    study = _flag_values("experiments/configs/study.py:demo", *study_flags)
    (_, _, through_study), = launch.run_configs(study, "projected-malperfusion_pig2human")
    for config in (single, through_study):
        for key, value in leaves.items():
            step, _, name = key.rpartition(".")
            got = config.augment[step][name] if step else config.augment[name]
            expected = ("projection", "l1_normalize") if key == "steps" else _changed(value)
            assert expected != value and got == expected, (key, got, expected)
    with pytest.raises(AttributeError, match="degres"):
        _flag_values("experiments/configs/run.py:baseline_human",
                     "--config.augment.affine.degres=10")
    with pytest.raises(AttributeError, match="degres"):
        _flag_values("experiments/configs/study.py:demo",
                     "--config.overrides.augment.affine.degres=10")


def test_the_study_makes_run_configs_with_the_run_config_file_it_names(tmp_path):
    recipe = tmp_path / "my_run.py"
    recipe.write_text(
        "from experiments.configs import run\n\n\n"
        "def get_config(arg):\n"
        "    config = run.get_config(arg)\n"
        "    config.augment.affine.degrees = 10.0\n"
        "    return config\n")
    config = study_config.get_config("demo,sim_tiny")
    assert Path(config.run_config) == REPOSITORY / "experiments/configs/run.py"
    with config.unlocked():
        config.run_config = str(recipe)
    for _, _, run in launch.run_configs(config, "projected-malperfusion_pig2human"):
        assert run.augment.affine.degrees == 10.0 and run.augment.projection.p == 0.8
        assert run.model.variant == "tiny" and run.data.dataset == "sim_tiny"
    with config.unlocked():
        config.run_config = str(tmp_path / "missing.py")
    with pytest.raises(FileNotFoundError, match=r"missing\.py"):
        launch.run_configs(config, "baseline_human")


def test_unknown_configuration_is_an_error():
    with pytest.raises(ValueError, match="unknown configuration 'baseline-human'"):
        parse_configuration("baseline-human")
    assert np.isnan(report.label_summary(
        ScoreTable(np.array(["a"]), np.array(["s"]), np.array([0]), {"dice": np.array([1.0])}),
        [report.KIDNEY])[0])


@SHARES_STUDY
def test_a_tiny_model_learns_and_beats_the_majority_class(study):
    """The quick model on simulated human images: loss falls; held-out pixels beat majority."""
    config, workdir, _ = study
    run = runs.train_config_of(run_config(f"baseline_human,quick,{config.dataset}"),
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

    catalog = datasets.ensure_catalog(["human"], config.dataset, config.data_dir)
    train_records, _ = runs.training_images(run, catalog)
    test_records = catalog.select(
        datasets.ensure_nested_specs(catalog, "human", config.data_dir, config.dataset)[0]
        .folds[0].test)
    assert not {r.subject for r in train_records} & {r.subject for r in test_records}
    classes = SPECIES_12.num_classes
    train_counts = np.zeros(classes, np.int64)
    for records, batch in evaluation_batches(catalog, train_records, 8):
        labels, valid = batch["labels"][:len(records)], batch["valid"][:len(records)]
        train_counts += np.bincount(labels[valid], minlength=classes)[:classes]
    majority = int(np.argmax(train_counts))
    predict = evaluation.predictor([(run, runs.restore_variables(run, directory))])
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


@SHARES_STUDY
def test_two_study_processes_on_one_workdir_train_each_run_once(study, tmp_path):
    """Two study processes at once on one work directory, one training itself, one with two
    local workers (submitit's local executor): datasets, specs and the bank are made once,
    every run is trained once, and the scores are the single-process study's."""
    config, single_workdir, _ = study
    workdir = tmp_path / "shared"
    logs = [tmp_path / f"study_{i}.log" for i in range(2)]
    with_workers = _study_process([*STUDY_FLAGS, f"--workdir={workdir}", "--launcher=local",
                                   "--config.launcher.workers=2"], logs[0])
    alone = _study_process([*STUDY_FLAGS, f"--workdir={workdir}"], logs[1])
    for process, log in zip((with_workers, alone), logs, strict=True):
        assert process.wait(timeout=1200) == 0, log.read_text()[-3000:]
    jobs = list((workdir / "jobs").rglob("*_log.*"))  # the local workers' logs
    text = "".join(path.read_text() for path in [*logs, *jobs])
    for made in (r"dataset human/sim_tiny in \S+", r"dataset pig/sim_tiny in \S+",
                 r"data specs of human/sim_tiny", r"malperfusion projections of pig \(\S+\)"):
        assert len(re.findall(made + ": building", text)) == 1, made
    pids = set()
    for key in launch.study_runs(config):
        sessions = (key.directory(workdir) / launch.CLAIMS_FILE).read_text().splitlines()
        assert len(sessions) == 1 and sessions[0].endswith(": start"), (key, sessions)
        pids.add(int(re.search(r"pid (\d+):", sessions[0])[1]))
    assert pids - {with_workers.pid, alone.pid}, "no run was trained by a local worker"
    assert (workdir / "report.md").exists()
    for name in STUDY_CONFIGURATIONS[:2]:
        for test_set in config.test_sets:
            ours, single = (ScoreTable.load(w / "scores" / name / f"{test_set}.npz").to_dict()
                            for w in (workdir, single_workdir))
            assert ours.keys() == single.keys()
            for column, values in single.items():
                np.testing.assert_array_equal(ours[column], values, err_msg=column)


@SHARES_STUDY
def test_a_killed_workers_run_is_taken_over_and_resumed(study, tmp_path):
    """A run's `--print_runs` command is killed mid-run; its claim is free again, and a study
    on the submitit launcher (debug executor) submits that run alone and resumes it."""
    config, _, _ = study
    workdir = tmp_path / "killed"
    flags = ["--config=experiments/configs/study.py:demo,sim_tiny",
             "--config.configurations=('baseline_human',)", "--config.test_sets=('physiological',)",
             f"--config.data_dir={config.data_dir}",  # the datasets the study fixture built
             "--config.overrides.train.epochs=1", "--config.overrides.train.epoch_size=320",
             "--config.overrides.train.checkpoint_every_steps=2", f"--workdir={workdir}"]
    printed = subprocess.run([sys.executable, "-m", "experiments.study", *flags, "--print_runs"],
                             cwd=REPOSITORY, capture_output=True, text=True, check=True)
    commands = printed.stdout.splitlines()
    assert len(commands) == 1 and commands[0].endswith("--run=baseline_human/outer_0/fold_0")

    directory = launch.RunKey("baseline_human", 0, 0).directory(workdir)
    log = tmp_path / "killed.log"
    worker = subprocess.Popen(commands[0], shell=True, start_new_session=True,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    def checkpoints():  # finished ones (orbax renames a step's folder when it is complete)
        return [int(p.name) for p in directory.glob("checkpoints/*") if p.name.isdigit()]

    deadline = time.monotonic() + 900
    while not checkpoints():
        assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    while time.monotonic() < deadline:  # until the group's python process is gone too
        try:
            os.killpg(worker.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert not runs.is_done(directory) and not is_claimed(directory)
    checkpoint = max(checkpoints())

    later = study_config.get_config("demo,sim_tiny")
    with later.unlocked():
        later.configurations, later.test_sets = ("baseline_human",), ("physiological",)
        later.data_dir = config.data_dir
        later.overrides.train.epochs, later.overrides.train.epoch_size = 1, 320
        later.overrides.train.checkpoint_every_steps = 2
        later.launcher.cluster = "debug"
    assert run_study(later, workdir, launcher="submitit").exists()
    sessions = (directory / launch.CLAIMS_FILE).read_text().splitlines()
    assert [s.split(": ")[-1] for s in sessions] == ["start", f"resume from step {checkpoint}"]
    assert json.loads((directory / runs.DONE_FILE).read_text())["step"] == 40


@SHARES_STUDY
def test_print_runs_commands_run_one_by_one_give_the_same_study(study, tmp_path):
    """The printed commands (baseline_human of the `study` fixture, two folds) run in turn:
    each trains its run, the one that finishes the last run scores and reports, and the scores
    are the single-process study's."""
    config, workdir, _ = study
    commands_workdir = tmp_path / "commands"
    flags = [*(f for f in STUDY_FLAGS if not f.startswith("--config.configurations=")),
             "--config.configurations=('baseline_human',)",
             f"--config.data_dir={config.data_dir}", f"--workdir={commands_workdir}"]
    print_runs = [sys.executable, "-m", "experiments.study", *flags, "--print_runs"]
    printed = subprocess.run(print_runs, cwd=REPOSITORY, capture_output=True, text=True,
                             check=True)
    commands = printed.stdout.splitlines()
    keys = [launch.RunKey("baseline_human", 0, fold) for fold in config.folds]
    assert [c.rsplit("--run=", 1)[-1] for c in commands] == [str(k) for k in keys]
    for i, command in enumerate(commands):
        assert not (commands_workdir / "report.md").exists(), f"a report before run {i + 1}"
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert runs.is_done(keys[i].directory(commands_workdir))
    assert (commands_workdir / "report.md").exists()
    for test_set in config.test_sets:
        ours, single = (ScoreTable.load(w / "scores/baseline_human" / f"{test_set}.npz")
                        for w in (commands_workdir, workdir))
        assert ours.to_dict().keys() == single.to_dict().keys()
        for column, values in single.to_dict().items():
            np.testing.assert_array_equal(ours.to_dict()[column], values, err_msg=column)
    again = subprocess.run(print_runs, cwd=REPOSITORY, capture_output=True, text=True,
                           check=True)
    assert again.stdout == ""  # nothing is missing


def test_sweeps_are_declared_in_the_config_file_and_name_misspelt_keys():
    config = study_config.get_config("demo")
    points = sweeps.points(REPOSITORY / "experiments/configs/study.py:demo")
    assert [sweeps.point_name(p) for p in points] == [
        "projection.p=0.4", "projection.p=0.8", "projection.p=1.0"]
    swept = sweeps.apply_point(config, points[0])
    (_, _, run), = launch.run_configs(swept, "projected-malperfusion_pig2human")
    assert run.augment.projection.p == 0.4
    assert config.overrides.augment.projection.p is None  # the study config is not changed
    with pytest.raises(KeyError, match=r"'overrides\.augment\.projektion\.p'"):
        sweeps.apply_point(config, {"overrides.augment.projektion.p": 0.5})
