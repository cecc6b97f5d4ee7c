"""The divergence sweep at a tiny size: two divergences, the baseline, the transfer and the
oracle, one network each."""

import json
import re

import pytest

from experiments.configs import sweep_divergence as sweep_config
from xeno_jax.evaluate import ScoreTable, bootstrap_class_level
from xeno_jax.labels import SPECIES_12
from xeno_jax.study import banks, launch, runs
from xeno_jax.study.divergence import SIMILARITY_FILE, point_folder, run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep")]
CONFIGURATIONS = ("baseline_human", "projected-malperfusion_pig2human",
                  "projected-malperfusion_human2human")
KIDNEY = SPECIES_12.name_to_index("kidney")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    config = sweep_config.get_config("controls,sim_tiny")
    with config.unlocked():
        config.divergences = (0.0, 1.0)
        with config.study.unlocked():
            config.study.data_dir = str(workdir / "tfds")
            config.study.configurations = CONFIGURATIONS
            config.study.folds = (0,)
            config.study.test_sets = ("malperfusion",)
            config.study.network_scores = False
            config.study.overrides.train.epochs = 1
            config.study.overrides.train.epoch_size = 16
    return config, workdir, run_sweep(config, workdir)


def test_networks_that_do_not_depend_on_the_divergence_train_once(sweep):
    config, workdir, _ = sweep
    for name in CONFIGURATIONS[:2]:
        directory = runs.runs_root(workdir, name, 0, 0)
        assert runs.is_done(directory)
        sessions = (directory / launch.CLAIMS_FILE).read_text().splitlines()
        assert len(sessions) == 1, sessions
        for divergence in config.divergences:
            link = point_folder(workdir, divergence) / "runs" / name
            assert link.is_symlink() and link.resolve() == (workdir / "runs" / name).resolve()
    # The oracle trains at each point, with maps learnt on that point's images.
    oracle = CONFIGURATIONS[2]
    made = []
    for divergence in config.divergences:
        directory = runs.runs_root(point_folder(workdir, divergence), oracle, 0, 0)
        assert runs.is_done(directory) and not (point_folder(workdir, divergence) / "runs"
                                                 / oracle).is_symlink()
        made.append(json.loads((directory / runs.DONE_FILE).read_text())["fingerprint"])
    assert made[0] != made[1]
    for dataset in ("sim_tiny", "sim_tiny-divergence0-from-pig"):
        assert banks.bank_path(config.study.data_dir, dataset, "malperfusion", "human").exists()


def test_the_sweeps_table_is_computed_from_the_points_scores(sweep):
    """Each cell against values recomputed from the points' score tables (sign included)."""
    config, workdir, path = sweep
    text = path.read_text()
    header, _, *rows = [line for line in text.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    table = [dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
             for row in rows]
    assert [row["divergence"] for row in table] == ["0", "1"]

    def kidney(divergence, name, metric):
        scores = bootstrap_class_level(ScoreTable.load(
            point_folder(workdir, divergence) / "scores" / name / "malperfusion.npz"), metric)
        return float(scores.mean[list(scores.labels).index(KIDNEY)])

    for divergence, row in zip(config.divergences, table, strict=True):
        similarity = json.loads((point_folder(workdir, divergence) / SIMILARITY_FILE)
                                .read_text())
        assert row["cosine"] == "{:.3f} [{:.3f}, {:.3f}]".format(*similarity["cosine"])
        base, xeno, oracle = (kidney(divergence, n, "full_dice") for n in CONFIGURATIONS)
        assert row["baseline: DSC, full labels"].split()[0] == f"{base:.3f}"
        assert row["oracle: DSC, full labels"].split()[0] == f"{oracle:.3f}"
        assert row["xeno-learning - baseline: DSC, full labels"] == f"{xeno - base:+.3f}"
        assert row["oracle - xeno-learning: DSC, full labels"] == f"{oracle - xeno:+.3f}"
        annotation = (kidney(divergence, CONFIGURATIONS[1], "dice")
                      - kidney(divergence, CONFIGURATIONS[0], "dice"))
        assert row["xeno-learning - baseline: DSC, annotation"] == f"{annotation:+.3f}"
    assert re.search(r"!\[sweep\]\(sweep\.png\)", text)
    assert (workdir / "sweep.png").stat().st_size > 0 and (workdir / "sweep.csv").exists()


def test_a_repeated_sweep_reuses_everything(sweep):
    config, workdir, path = sweep
    files = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")
             if p.is_file() and "runs" in p.parts and p.name != ".lock"}
    text = path.read_text()
    run_sweep(config, workdir)
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert path.read_text() == text
