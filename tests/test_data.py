"""Species datasets (TFDS builders), real Tivita ingestion, splits, sampler and pipeline."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_builders
from data_builders.pig.pig_dataset_builder import AORTIC_LABELS
from data_builders.species_builder import SIM_SMALL, TIVITA, SimulatedSet, SpeciesBuilder
from data_builders.tivita_data import InvalidDataError
from xeno_jax import analysis, simulate
from xeno_jax.data import (
    Catalog,
    DataSpec,
    LabelBalancedSampler,
    Record,
    evaluation_batches,
    nested_cross_validation,
    spec_name,
    train_iterator,
)
from xeno_jax.io import tivita
from xeno_jax.labels import SPECIES_12
from xeno_jax.train.parallel import DATA_AXIS, make_mesh

TINY = dict(height=16, width=20)


@pytest.fixture(scope="session")
def pig_tiny(tmp_path_factory):
    """The pig sim_small dataset at 16 x 20 pixels, four images per experiment (``sim_micro``)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    config = dataclasses.replace(SIM_SMALL, name="sim_micro", max_images_per_set=4, **TINY)
    builder = data_builders.builder_class("pig")(config=config, data_dir=str(data_dir),
                                                 file_format="array_record")
    builder.download_and_prepare()
    return builder, data_dir


def test_beam_build_gives_the_local_examples(pig_tiny, tmp_path, stored_examples):
    """On Apache Beam (DirectRunner; one element per generation batch) the simulated build
    stores exactly the local build's examples: same names, order and bytes of every feature."""
    local, _ = pig_tiny
    builder = data_builders.builder_class("pig")(config=local.builder_config,
                                                 data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        beam_options=data_builders.beam_options("runner=DirectRunner")))
    expected = stored_examples(local)
    assert sum(map(len, expected.values())) == 24  # 4 images in each of 6 sets
    assert stored_examples(builder) == expected
    assert builder.info.metadata == local.info.metadata


def test_simulated_dataset_reads_back_in_a_fresh_process(pig_tiny, tmp_path):
    builder, data_dir = pig_tiny
    out = tmp_path / "read.npz"
    script = textwrap.dedent(f"""
        import numpy as np, sys, tensorflow_datasets as tfds
        source = tfds.data_source("pig/sim_micro", data_dir={str(data_dir)!r})["malperfusion"]
        rows = [source[i] for i in range(len(source))]
        assert "data_builders" not in sys.modules and "tensorflow" not in sys.modules
        np.savez({str(out)!r}, names=[r["image_name"].decode() for r in rows],
                 cubes=np.stack([r["cube"] for r in rows]),
                 labels=np.stack([r["labels"] for r in rows]),
                 saturation=np.stack([r["saturation"] for r in rows]))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    read = np.load(out)
    plan = {builder.image_name(*item): item for item in builder.planned_images()}
    assert len(read["names"]) == sum(item[1].split == "malperfusion" for item in plan.values())
    for i, name in enumerate(read["names"]):
        key, spec = builder.image_spec(*plan[str(name)])
        expected = simulate.generate(key, spec, **TINY)
        np.testing.assert_array_equal(read["cubes"][i],
                                      np.asarray(expected["cube"]).astype(np.float16))
        np.testing.assert_array_equal(read["labels"][i], np.asarray(expected["labels"]))
        np.testing.assert_array_equal(read["saturation"][i],
                                      np.asarray(expected["saturation"]).astype(np.float16))


def test_simulated_splits_and_features(pig_tiny):
    builder, _ = pig_tiny
    assert set(builder.info.splits) == {"physiological", "malperfusion", "icg"}
    example = builder.as_data_source("icg")[0]
    assert example["cube"].shape == (16, 20, 100) and example["cube"].dtype == np.float16
    assert example["labels"].dtype == np.uint8 and example["valid"].dtype == bool
    assert example["perfusion_state"] == b"icg" and example["species"] == b"pig"
    assert example["icg_plasma_molar"] > 0
    valid = example["valid"]  # semantic annotations: the full ground truth wherever valid
    np.testing.assert_array_equal(example["labels_full"][valid], example["labels"][valid])


def test_polygon_annotations_keep_the_full_ground_truth(pig_tiny):
    builder, _ = pig_tiny
    polygon = SimulatedSet("kidney", "malperfusion", "malperfusion", subjects=1,
                           images_per_subject=(1,), first_subject=1, focus=("kidney",),
                           annotation="polygon")
    full = np.array([[6, 4], [0, 12]])
    zeros = np.zeros((2, 2), np.float32)
    out = {"labels": full, "cube": np.zeros((2, 2, 100), np.float32), "saturation": zeros,
           "blood_volume": zeros, "metadata": dict.fromkeys(
               ("severity", "minutes", "icg_dose_mg_kg", "icg_plasma_molar"), 0.0)}
    example = builder._simulated_example("P001#x", polygon, 1, 0, out)
    np.testing.assert_array_equal(example["labels"], [[6, 12], [12, 12]])  # kidney only
    np.testing.assert_array_equal(example["labels_full"], full)
    np.testing.assert_array_equal(example["valid"], [[True, False], [False, False]])


def test_pathological_images_count_only_the_organs_their_pathology_acts_on(pig_tiny):
    """Read through the dataset's files alone (a TFDS read-only builder: sim_micro is not a
    registered config), the metadata says which organs each experiment's pathology acts on,
    and the analyses' extraction keeps only those."""
    _, data_dir = pig_tiny
    catalog = Catalog(["pig/sim_micro:malperfusion", "pig/sim_micro:icg"], data_dir)
    acted_on = {"kidney": ("kidney",), "aortic_clamping": AORTIC_LABELS}
    organs = {r.experiment: catalog.pathological_organs(r) for r in catalog.records}
    assert organs == {"icg": tuple(range(1, 12)), **{
        e: tuple(sorted(SPECIES_12.name_to_index(n) for n in names))
        for e, names in acted_on.items()}}
    table = analysis.extract(catalog, catalog.records, parts=1)
    shown = {(r.image_name, label) for r in catalog.records for label in r.labels if label > 0}
    kept = set(zip(table.image_name, table.label.tolist(), strict=True))
    left_out = shown - kept
    assert left_out, "no image shows an organ its pathology spares: the test cannot fail"
    for name, label in left_out:
        assert label not in organs[catalog[name].experiment]
    assert {(n, label) for n, label in kept if label in organs[catalog[n].experiment]} == kept


# -- real Tivita data in the reference layout -------------------------------------------------

DATASET_IDS = {"background": 0, "kidney": 3, "liver": 7, "meso": 5, "gallbladder": 9,
               "unlabeled": 255}


def write_reference_dataset(root, rng, n=4):
    tivita.write_dataset_settings(root, {
        "dataset_name": "test_multiorgan", "label_mapping": DATASET_IDS,
        "last_valid_label_index": 9, "annotation_name_default": "semantic#primary"})
    written = {}
    for i in range(n):
        subject, timestamp = f"P{90 + i // 2:03d}", f"2021_04_{10 + i:02d}_09_22_02"
        cube = rng.uniform(0, 1, (12, 16, 100)).astype(np.float32)
        mask = rng.choice(list(DATASET_IDS.values()), size=(12, 16)).astype(np.uint8)
        tivita.write_image(root, subject, timestamp, cube, {"semantic#primary": mask})
        written[f"{subject}#{timestamp}"] = (cube, mask)
    return written


def tivita_builder(data_dir):
    config = dataclasses.replace(TIVITA, name="tivita_small", height=12, width=16)
    return data_builders.builder_class("pig")(config=config, data_dir=str(data_dir),
                                              file_format="array_record")


def build_tivita(root, data_dir):
    builder = tivita_builder(data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return builder


@pytest.mark.parametrize("species", data_builders.SPECIES)
def test_builder_folders_follow_the_tfds_convention(species, tmp_path):
    folder = Path(data_builders.__file__).parent / species
    assert (folder / f"{species}_dataset_builder.py").exists()
    assert "## Configs" in (folder / "README.md").read_text()
    builder = data_builders.builder_class(species)(config="sim_tiny", data_dir=str(tmp_path))
    assert "doi = {10.1038/s41551-025-01585-4}" in " ".join(builder.info.citation.split())


def test_tivita_ingestion(tmp_path):
    root = tmp_path / "dataset"
    written = write_reference_dataset(root, np.random.default_rng(0))
    image = tivita.discover_images(root)[1]
    meta = image.cube_path.parent / "annotations" / f"{image.timestamp}_meta.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"phase_type": "ischemia", "experiment": "kidney"}))
    builder = build_tivita(root, tmp_path / "tfds")
    assert set(builder.info.splits) == {"physiological", "malperfusion"}
    rows = [*builder.as_data_source("physiological"), *builder.as_data_source("malperfusion")]
    assert len(rows) == len(written)
    expected_label = {0: 0, 3: 6, 7: 4, 5: 2, 9: 12, 255: 12}  # by name through SPECIES_12
    for row in rows:
        cube, mask = written[row["image_name"].decode()]
        np.testing.assert_array_equal(row["cube"], cube.astype(np.float16))  # orientation kept
        np.testing.assert_array_equal(row["labels"], np.vectorize(expected_label.get)(mask))
        np.testing.assert_array_equal(row["valid"], row["labels"] != SPECIES_12.invalid_index)
        is_ischemic = row["image_name"].decode() == image.image_name
        assert (row["perfusion_state"] == b"malperfusion") == is_ischemic
        assert (row["experiment"] == b"kidney") == is_ischemic


def test_tivita_missing_files_are_listed(tmp_path):
    root = tmp_path / "dataset"
    write_reference_dataset(root, np.random.default_rng(1))
    images = tivita.discover_images(root)
    images[0].cube_path.unlink()
    images[2].annotation_path.unlink()
    with pytest.raises(InvalidDataError) as error:
        build_tivita(root, tmp_path / "tfds")
    assert "2 of 4 images" in str(error.value)
    assert str(images[0].cube_path) in str(error.value)
    assert str(images[2].annotation_path) in str(error.value)


def test_interrupted_tivita_build_leaves_nothing_complete(tmp_path, monkeypatch):
    root = tmp_path / "dataset"
    write_reference_dataset(root, np.random.default_rng(2))
    data_dir = tmp_path / "tfds"
    calls = []
    original = tivita.read_cube

    def failing_read(path):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk went away")
        return original(path)

    monkeypatch.setattr(tivita, "read_cube", failing_read)
    with pytest.raises(RuntimeError, match="disk went away"):
        build_tivita(root, data_dir)
    assert not tivita_builder(data_dir).is_prepared()
    assert not list(data_dir.glob("**/dataset_info.json"))
    monkeypatch.setattr(tivita, "read_cube", original)
    builder = build_tivita(root, data_dir)
    assert builder.is_prepared()
    assert builder.info.splits["physiological"].num_examples == 4


# -- a new species --------------------------------------------------------------------------

def test_a_new_species_builds_and_reads(tmp_path):
    """The README recipe: species priors, then a builder subclass."""
    simulate.register_species("test_ferret", simulate.make_species(
        42, hemoglobin_g_l=160.0, hematocrit=0.5, blood_scale={"liver": 1.3},
        anatomy_scale=0.3, bowel_diameter_mm=6.0), overwrite=True)

    class Builder(SpeciesBuilder):
        name = "test_ferret"
        SPECIES = "test_ferret"
        SUBJECT_FORMAT = "F{:03d}"

        def small_sets(self):
            return [SimulatedSet("semantic", "physiological", "physiological", subjects=2,
                                 images_per_subject=(2,), first_subject=1, focus=(None, "liver")),
                    SimulatedSet("kidney", "malperfusion", "malperfusion", subjects=1,
                                 images_per_subject=(2,), first_subject=9, focus=("kidney",),
                                 severity=(0.5, 1.0), annotation="polygon")]

    builder = Builder(config=dataclasses.replace(SIM_SMALL, name="sim_micro", **TINY),
                      data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = tfds.data_source("test_ferret/sim_micro", data_dir=str(tmp_path))
    assert len(source["physiological"]) == 4 and len(source["malperfusion"]) == 2
    row = source["malperfusion"][0]
    assert row["species"] == b"test_ferret" and row["subject"] == b"F009"
    kidney = SPECIES_12.name_to_index("kidney")
    assert set(np.unique(row["labels"])) <= {kidney, SPECIES_12.invalid_index}  # polygon


# -- splits --------------------------------------------------------------------------------

def synthetic_records(num_subjects=24, images=3, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for s in range(num_subjects):
        for i in range(images):
            labels = tuple(sorted({0, *rng.choice(np.arange(1, 12), rng.integers(1, 5))}))
            records.append(Record(f"S{s:02d}#{i}", f"S{s:02d}", "pig", "physiological",
                                  "semantic", 0, len(records), labels))
    return records


def test_nested_cross_validation_by_subject(tmp_path):
    records = synthetic_records()
    subject_of = {r.image_name: r.subject for r in records}
    specs = nested_cross_validation(records, seed=0)
    assert len(specs) == 3 and all(len(s.folds) == 5 for s in specs)
    tested = Counter()
    for spec in specs:
        test_subjects = {subject_of[n] for n in spec.folds[0].test}
        tested.update(test_subjects)
        for fold in spec.folds:
            train = {subject_of[n] for n in fold.train}
            val = {subject_of[n] for n in fold.validation_sets["val"]}
            test = {subject_of[n] for n in fold.test}
            assert not train & val and not train & test and not val & test
            assert test == test_subjects
            assert train | val | test == set(subject_of.values())
    assert set(tested.values()) == {1} and len(tested) == 24
    again = nested_cross_validation(records, seed=0)
    assert [s.to_json() for s in again] == [s.to_json() for s in specs]
    other = nested_cross_validation(records, seed=1)
    assert [s.to_json() for s in other] != [s.to_json() for s in specs]
    specs[0].save(tmp_path / "spec.json")
    assert DataSpec.load(tmp_path / "spec.json") == specs[0]


def test_data_spec_rejects_bad_files(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps([{"fold_name": "fold_0", "learn": {"image_names": []}}]))
    with pytest.raises(ValueError, match="'learn' must start with train, val or test"):
        DataSpec.load(path)
    path.write_text(json.dumps([{"fold_name": "fold_0", "train": {"image_names": "x"}}]))
    with pytest.raises(ValueError, match=str(path)):
        DataSpec.load(path)


# -- sampler -------------------------------------------------------------------------------

def test_sampler_is_deterministic_and_reaches_every_image():
    records = synthetic_records(num_subjects=12, images=4, seed=3)
    sampler = LabelBalancedSampler(records, batch_size=8, seed=0)
    assert sampler.batch(7).tolist() == LabelBalancedSampler(records, 8, seed=0).batch(7).tolist()
    assert sampler.batch(7).tolist() != sampler.batch(8).tolist()
    drawn = {int(p) for i in range(2000) for p in sampler.batch(i)}
    assert drawn == set(range(len(records)))


def test_sampler_balances_labels_then_subjects():
    """One label per image, so the drawn label is observable: label s % 3 for subject s, who has
    s + 1 images. Labels and, within a label, subjects must come out uniform."""
    records = [Record(f"S{s}#{i}", f"S{s}", "pig", "x", "x", 0, 0, (s % 3,))
               for s in range(9) for i in range(1 + s)]
    sampler = LabelBalancedSampler(records, batch_size=8, seed=1)
    picked = [records[p] for i in range(5000) for p in sampler.batch(i)]  # 40,000 draws
    label_freq = np.bincount([r.labels[0] for r in picked], minlength=3) / len(picked)
    np.testing.assert_allclose(label_freq, 1 / 3, atol=0.012)  # about 5 standard errors
    for label in range(3):
        subjects = Counter(r.subject for r in picked if r.labels[0] == label)
        freq = np.array(list(subjects.values())) / sum(subjects.values())
        np.testing.assert_allclose(freq, 1 / 3, atol=0.02)  # uniform despite 1..9 images


def test_joint_sampler_draws_from_every_domain():
    records = [Record(f"{sp}{i}", f"{sp}{i % 3}", sp, "x", "x", 0, 0, (0, 1 + i % 2))
               for sp in ("human", "pig", "rat") for i in range(6)]
    sampler = LabelBalancedSampler(records, batch_size=8, seed=0, domain="species")
    species = Counter(records[p].species for i in range(500) for p in sampler.batch(i))
    np.testing.assert_allclose(np.array(list(species.values())) / 4000, 1 / 3, atol=0.03)


# -- pipeline ------------------------------------------------------------------------------

def test_pipeline_global_batches_and_resume(pig_tiny):
    _, data_dir = pig_tiny
    catalog = Catalog(["pig/sim_micro:physiological"], data_dir)
    records = catalog.filter(experiment="semantic")
    mesh = make_mesh(8)
    iterator = train_iterator(catalog, records, batch_size=8, mesh=mesh, seed=3)
    batches = [next(iterator) for _ in range(3)]
    batch = batches[0]
    assert batch["features"].shape == (8, 16, 20, 100)
    assert batch["features"].sharding.spec[0] == DATA_AXIS
    assert len(batch["features"].sharding.device_set) == 8
    np.testing.assert_allclose(np.abs(np.asarray(batch["features"])).sum(-1), 1.0, rtol=2e-3)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = train_iterator(catalog, records, batch_size=8, mesh=mesh, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))


def test_evaluation_batches_keep_order_and_pad(pig_tiny):
    _, data_dir = pig_tiny
    catalog = Catalog(["pig/sim_micro:malperfusion"], data_dir)
    records = catalog.records
    seen = []
    for batch_records, batch in evaluation_batches(catalog, records, batch_size=3):
        assert batch["features"].shape[0] == 3
        seen += [r.image_name for r in batch_records]
        first = catalog.read(batch_records[0])
        np.testing.assert_array_equal(batch["labels"][0], first["labels"])
    assert seen == [r.image_name for r in records]


def test_catalog_reports_unknown_images(pig_tiny):
    _, data_dir = pig_tiny
    catalog = Catalog(["pig/sim_micro:icg"], data_dir)
    with pytest.raises(KeyError, match="2 images are in none of"):
        catalog.select(["nope", catalog.records[0].image_name, "neither"])
    with pytest.raises(ValueError, match="no split 'malperfused'"):
        Catalog(["pig/sim_micro:malperfused"], data_dir)
    assert jax.device_count() == 8


def test_tfds_build_command_works_without_tensorflow(tmp_path):
    """``python -m data_builders build`` = ``tfds build`` minus the TensorFlow import."""
    subprocess.run(
        [sys.executable, "-m", "data_builders", "build", "data_builders/pig",
         "--config=sim_tiny", "--max_examples_per_split=2", f"--data_dir={tmp_path}",
         "--file_format=array_record"], check=True, timeout=600, capture_output=True)
    source = tfds.data_source("pig/sim_tiny", data_dir=str(tmp_path))
    assert {len(source[split]) for split in source} == {2}
    assert source["physiological"][0]["cube"].shape == (32, 40, 100)


def test_reference_data_spec_gives_its_exact_folds(pig_tiny, tmp_path):
    """``config.data.spec``: a spec in the reference's JSON format is the split source, and our
    exported specs re-import to the same folds."""
    from experiments.configs.run import get_config as run_config
    from xeno_jax.study import datasets, runs

    _, data_dir = pig_tiny
    catalog = Catalog(["pig/sim_micro:physiological"], data_dir)
    names = sorted(r.image_name for r in catalog.records)
    entry = lambda chosen: {"image_names": [f"{n}@semantic#primary" for n in chosen],
                            "data_path_class": "htc.tivita.DataPathMultiorgan>DataPathMultiorgan"}
    folds = [{"fold_name": f"fold_{k}", "train_semantic": entry(names[k:k + 3]),
              "val_semantic": entry(names[k + 3:k + 4]), "test": entry(names[-1:])}
             for k in range(2)]
    path = tmp_path / "pig_reference_spec.json"
    path.write_text(json.dumps(folds))
    config = run_config("baseline_pig,sim_micro")
    with config.unlocked():
        config.data.data_dir, config.data.spec, config.data.fold = str(data_dir), str(path), 1
    train, val = runs.training_images(config, catalog)
    assert [r.image_name for r in train] == names[1:4]
    assert [r.image_name for r in val] == names[4:5]
    # Our nested specs, exported under the reference's names, re-import to the same folds.
    specs = nested_cross_validation(synthetic_records(), seed=0)
    for outer, spec in enumerate(specs):
        spec.save(tmp_path / spec_name("pig", outer))
        assert datasets.ensure_outer_spec(catalog, "pig", outer, data_dir, "sim_micro",
                                          str(tmp_path)) == spec
    # The study passes the spec folder to every run; one file cannot serve three outer folds.
    from experiments.configs.study import get_config
    from xeno_jax.study.launch import run_configs

    study = get_config("full")
    with study.unlocked():
        study.data.spec = str(tmp_path)
    assert {run.data.spec for _, _, run in run_configs(study, "baseline_pig")} == {str(tmp_path)}
    with study.unlocked():
        study.data.spec = str(path)
    with pytest.raises(ValueError, match="is one spec file, but the study has outer folds"):
        run_configs(study, "baseline_pig")
