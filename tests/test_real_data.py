"""Real Tivita data end to end: full-size cubes in the reference layout, formats, bad data.

The datasets here are written by code that follows method.md B3 on its own (big-endian header
and data, ``out[y, x, c] = raw[x, H - 1 - y, c]``, pickle header + blosc chunks), not by
`xeno_jax.io.tivita`'s writers, and expectations are computed independently of the builder.
"""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import blosc
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_builders
from data_builders import tivita_data
from data_builders.species_builder import SpeciesBuilder
from data_builders.tivita_data import CHECKS_FILE, InvalidDataError, RealDataOptions

IDS = {"background": 0, "stomach": 1, "kidney": 3, "meso": 5, "liver": 7, "gallbladder": 9,
       "unlabeled": 255}
# By name through the 12-class mapping (method.md A7): meso is small_bowel, the rest invalid.
EXPECTED_INDEX = {0: 0, 1: 1, 3: 6, 5: 2, 7: 4, 9: 12, 255: 12}
REPO = Path(__file__).resolve().parents[1]


# -- an independent writer of the reference layout ---------------------------------------------

def write_dat(path: Path, cube: np.ndarray) -> None:
    """A ``_SpecCube.dat`` file: raw[x, H-1-y, c] = cube[y, x, c], big-endian (method.md B3)."""
    height, width, channels = cube.shape
    raw = np.empty((width, height, channels), ">f4")
    ys, xs = np.mgrid[0:height, 0:width]
    raw[xs, height - 1 - ys] = cube[ys, xs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.array([width, height, channels], ">i4").tobytes() + raw.tobytes())


def write_blosc(path: Path, data) -> None:
    """The reference's blosc container: pickled header, then one blosc chunk per array."""
    def chunk(a):
        a = np.ascontiguousarray(a)
        return blosc.compress(a.tobytes(), typesize=a.dtype.itemsize, clevel=9, cname="zstd",
                              shuffle=blosc.SHUFFLE)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        chunks = {k: chunk(v) for k, v in data.items()}
        header = {k: (v.shape, v.dtype, len(chunks[k])) for k, v in data.items()}
        path.write_bytes(pickle.dumps(header) + b"".join(chunks.values()))
    else:
        path.write_bytes(pickle.dumps((data.shape, data.dtype)) + chunk(data))


def write_dataset(root: Path, images: dict, *, label_mapping=IDS, default="semantic#primary"):
    """images: {(subject, timestamp, overlap): {"cube", "masks", "meta"?, "l1"?, "params"?}}."""
    settings = {"dataset_name": "test", "label_mapping": label_mapping,
                "last_valid_label_index": 9, "annotation_name_default": default}
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "dataset_settings.json").write_text(json.dumps(settings))
    for (subject, timestamp, overlap), image in images.items():
        folder = root / "data" / ("overlap" if overlap else "subjects") / subject / timestamp
        write_dat(folder / f"{timestamp}_SpecCube.dat", image["cube"])
        name = f"{subject}#{timestamp}" + ("#overlap" if overlap else "")
        inter = root / "intermediates"
        if image.get("masks") is not None:
            write_blosc(inter / "segmentations" / f"{name}.blosc", image["masks"])
        if "meta" in image:
            (folder / "annotations").mkdir(exist_ok=True)
            (folder / "annotations" / f"{timestamp}_meta.json").write_text(
                json.dumps(image["meta"]))
        if "l1" in image:
            write_blosc(inter / "preprocessing" / "L1" / f"{name}.blosc", image["l1"])
        if "params" in image:
            write_blosc(inter / "preprocessing" / "parameter_images" / f"{name}.blosc",
                        image["params"])


def random_image(rng, height, width, masks=("semantic#primary",)):
    cube = rng.uniform(0.01, 1.0, (height, width, 100)).astype(np.float32)
    ids = np.array(list(IDS.values()), np.uint8)
    return {"cube": cube, "masks": {m: rng.choice(ids, (height, width)) for m in masks}}


def expected_labels(mask):
    return np.vectorize(EXPECTED_INDEX.get)(mask).astype(np.uint8)


def rows(builder) -> dict[str, dict]:
    return {row["image_name"].decode(): row for split in builder.info.splits
            for row in builder.as_data_source(split)}


def build(root, data_dir, *, beam=False, **options):
    """Builds locally, or on Beam's DirectRunner (in this process) with ``beam``."""
    builder = data_builders.builder("pig", "tivita", data_dir=str(data_dir),
                                    real_data=RealDataOptions(**options))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(root),
        beam_options=data_builders.beam_options("runner=DirectRunner") if beam else None))
    return builder


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# -- full size (480 x 640 x 100), built once -----------------------------------------------------

@pytest.fixture(scope="session")
def real_size(tmp_path_factory):
    """Two camera-size images (one ischemic, one in the overlap folder) built with the CLI."""
    root = tmp_path_factory.mktemp("real") / "P_dataset"
    rng = np.random.default_rng(7)
    images = {("P901", "2099_01_01_11_00_00", False): random_image(rng, 480, 640),
              ("P902", "2099_01_02_10_00_00", True): random_image(rng, 480, 640)}
    images["P901", "2099_01_01_11_00_00", False]["meta"] = {
        "phase_type": "ischemia", "experiment": "kidney", "clamping_location": "renal_artery",
        "reperfused": False, "phase_time": 300}
    write_dataset(root, images)
    data_dir = root.parent / "tfds"
    run("-m", "data_builders", "build", "data_builders/pig", "--config=tivita",
        f"--manual_dir={root}", f"--data_dir={data_dir}", "--file_format=array_record")
    expected = {f"{s}#{t}" + ("#overlap" if o else ""): image
                for (s, t, o), image in images.items()}
    return root, data_dir, expected


def test_real_size_cubes_read_back_exactly(real_size):
    _, data_dir, expected = real_size
    builder = tfds.builder("pig/tivita", data_dir=str(data_dir))
    assert builder.info.metadata["image_size"] == [480, 640]
    assert builder.info.metadata["cube_source"] == "dat"
    assert set(builder.info.splits) == {"physiological", "malperfusion"}
    got = rows(builder)
    assert set(got) == set(expected)
    for name, image in expected.items():
        row = got[name]
        assert row["cube"].shape == (480, 640, 100)
        np.testing.assert_array_equal(row["cube"], image["cube"].astype(np.float16))
        np.testing.assert_array_equal(row["labels"],
                                      expected_labels(image["masks"]["semantic#primary"]))
        np.testing.assert_array_equal(row["valid"], row["labels"] != 12)
    ischemic = got["P901#2099_01_01_11_00_00"]
    assert ischemic["perfusion_state"] == b"malperfusion" and ischemic["experiment"] == b"kidney"
    assert ischemic["clamping_location"] == b"renal_artery" and ischemic["reperfused"] == 0
    assert ischemic["phase_time"] == 300
    assert got["P902#2099_01_02_10_00_00#overlap"]["reperfused"] == -1


def test_real_size_builds_the_same_through_build_data(real_size, tmp_path):
    root, data_dir, _ = real_size
    run("-m", "experiments.build_data", "--species=pig", "--dataset=tivita",
        f"--manual_dir={root}", f"--data_dir={tmp_path}")
    first = rows(tfds.builder("pig/tivita", data_dir=str(data_dir)))
    second = rows(tfds.builder("pig/tivita", data_dir=str(tmp_path)))
    assert set(first) == set(second)
    for name, row in first.items():
        for key in ("cube", "labels", "valid", "perfusion_state", "annotation_labels"):
            np.testing.assert_array_equal(second[name][key], row[key])


def test_the_spectral_analyses_run_on_real_size_data(real_size, tmp_path):
    _, data_dir, _ = real_size
    run("-m", "experiments.analyze", "--species=pig", "--dataset=tivita",
        f"--data_dir={data_dir}", "--analyses=spectra,pca", "--resamples=20",
        f"--workdir={tmp_path}")
    text = (tmp_path / "analysis.md").read_text()
    assert "2 images" in text and "## Organ spectra" in text and "## PCA and StO2" in text
    for name in ("spectra.csv", "sto2.csv", "pca_malperfusion.png"):
        assert (tmp_path / name).stat().st_size > 0


# -- the reference's formats (small images) ------------------------------------------------------

def test_mixed_sizes_are_rejected_with_a_listing(tmp_path):
    rng = np.random.default_rng(0)
    write_dataset(tmp_path / "d", {("P001", "t1", False): random_image(rng, 6, 8),
                                   ("P001", "t2", False): random_image(rng, 6, 8),
                                   ("P002", "t3", False): random_image(rng, 4, 8)})
    with pytest.raises(ValueError, match=r"2 sizes \(6 x 8: 2 images, e.g. P001#t1; "
                                         r"4 x 8: 1 images, e.g. P002#t3\)"):
        build(tmp_path / "d", tmp_path / "tfds")


def test_l1_files_are_used_when_every_image_has_one(tmp_path):
    rng = np.random.default_rng(1)
    images = {("P001", "t1", False): random_image(rng, 6, 8),
              ("P001", "t2", False): random_image(rng, 6, 8)}
    for image in images.values():
        cube = image["cube"]
        image["l1"] = (cube / np.abs(cube).sum(-1, keepdims=True)).astype(np.float16)
    write_dataset(tmp_path / "d", images)
    builder = build(tmp_path / "d", tmp_path / "tfds")
    assert builder.info.metadata["cube_source"] == "L1"
    for (s, t, _), image in images.items():
        np.testing.assert_array_equal(rows(builder)[f"{s}#{t}"]["cube"], image["l1"])
    # One image without its L1 file: the .dat cubes of all, and the metadata says so.
    (tmp_path / "d" / "intermediates" / "preprocessing" / "L1" / "P001#t2.blosc").unlink()
    builder = build(tmp_path / "d", tmp_path / "tfds2")
    assert builder.info.metadata["cube_source"] == "dat"
    np.testing.assert_array_equal(rows(builder)["P001#t1"]["cube"],
                                  images["P001", "t1", False]["cube"].astype(np.float16))


def test_annotations_by_name_suffix_and_several_kept(tmp_path):
    rng = np.random.default_rng(2)
    names = ("semantic#primary", "polygon#annotator1", "polygon#annotator2")
    images = {("P001", "t1", False): random_image(rng, 6, 8, names),
              ("P001", "t2", False): random_image(rng, 6, 8, names[:2])}
    write_dataset(tmp_path / "d", images)
    builder = build(tmp_path / "d", tmp_path / "tfds", annotations=names[1:])
    assert builder.info.metadata["annotation_names"] == list(names[1:])
    got = rows(builder)
    for (s, t, _), image in images.items():
        row = got[f"{s}#{t}"]
        np.testing.assert_array_equal(row["labels"],
                                      expected_labels(image["masks"]["polygon#annotator1"]))
        assert row["annotation_labels"].shape == (2, 6, 8)
        second = image["masks"].get("polygon#annotator2")
        np.testing.assert_array_equal(row["annotation_labels"][1], np.full((6, 8), 12)
                                      if second is None else expected_labels(second))
    # The @ suffix of an image name selects that image's annotation.
    builder = build(tmp_path / "d", tmp_path / "tfds2",
                    images=("P001#t1@polygon#annotator2", "P001#t2"))
    got = rows(builder)
    np.testing.assert_array_equal(got["P001#t1"]["labels"], expected_labels(
        images["P001", "t1", False]["masks"]["polygon#annotator2"]))
    np.testing.assert_array_equal(got["P001#t2"]["labels"], expected_labels(
        images["P001", "t2", False]["masks"]["semantic#primary"]))


def test_vendor_parameter_images_are_kept(tmp_path):
    rng = np.random.default_rng(3)
    images = {("P001", "t1", False): random_image(rng, 6, 8)}
    params = {"StO2": rng.uniform(0, 1, (6, 8)).astype(np.float32),
              "NIR": rng.uniform(0, 1, (6, 8)).astype(np.float32)}
    images["P001", "t1", False]["params"] = params
    write_dataset(tmp_path / "d", images)
    builder = build(tmp_path / "d", tmp_path / "tfds")
    assert builder.info.metadata["parameter_names"] == ["NIR", "StO2"]
    row = rows(builder)["P001#t1"]
    np.testing.assert_array_equal(row["parameter_images"],
                                  np.stack([params["NIR"], params["StO2"]], -1).astype(np.float16))


# -- bad data (issue 16 cases 4, 5, 9) -----------------------------------------------------------

def bad_dataset(root, rng):
    images = {(f"P00{i}", f"t{i}", False): random_image(rng, 6, 8) for i in range(1, 9)}
    images["P001", "t1", False]["cube"][2, 3, 5] = np.nan
    images["P002", "t2", False]["cube"][0, 0, :] = np.inf
    images["P003", "t3", False]["cube"][1, 1, 1] = 1e6  # overflows float16
    images["P004", "t4", False]["cube"][4, 4, :] = 0  # an all-zero pixel
    images["P005", "t5", False]["masks"] = {"semantic#primary": np.zeros((480, 640), np.uint8)}
    images["P006", "t6", False]["masks"]["semantic#primary"][0, 0] = 42  # no name has id 42
    images["P007", "t7", False]["masks"] = None  # no annotation file
    write_dataset(root, images)
    (root / "data" / "subjects" / os.fsdecode(b"P\xff9") / "t9").mkdir(parents=True)  # not UTF-8
    return images


def test_bad_images_are_reported_together_and_never_stored(tmp_path):
    bad_dataset(tmp_path / "d", np.random.default_rng(4))
    with pytest.raises(InvalidDataError) as error:
        build(tmp_path / "d", tmp_path / "tfds")
    message = str(error.value)
    assert "8 of 9 images" in message
    for expected in ("P001#t1: cube: 1 NaN and 0 infinite values",
                     "P002#t2: cube: 0 NaN and 100 infinite values",
                     "P003#t3: cube: 1 values beyond the float16 range",
                     "P004#t4: cube: 1 pixels are zero in every channel",
                     "annotation of size 480 x 640, the cube is 6 x 8",
                     "label ids [42] (1 pixels) are not in the label_mapping",
                     "P007#t7.blosc", "'P\\udcff9'", "is not valid UTF-8"):
        assert expected in message, expected
    version = str(SpeciesBuilder.VERSION)
    assert not (tmp_path / "tfds" / "pig" / "tivita" / version).exists()
    assert not list((tmp_path / "tfds").glob("**/incomplete.*"))
    # With skip_invalid: only the good image, the others recorded with their problems.
    builder = build(tmp_path / "d", tmp_path / "tfds", skip_invalid=True)
    assert set(rows(builder)) == {"P008#t8"}
    skipped = builder.info.metadata["skipped_images"]
    assert len(skipped) == 8 and "P006#t6" in skipped and "NaN" in skipped["P001#t1"][0]
    assert all(np.isfinite(r["cube"]).all() for r in rows(builder).values())


@pytest.mark.parametrize("typo, closest", [("kidnee", "kidney"), ("Liver", "liver")])
def test_unknown_label_names_fail_with_the_closest_names(tmp_path, typo, closest):
    rng = np.random.default_rng(5)
    mapping = {(typo if n == closest else n): i for n, i in IDS.items()}
    image = random_image(rng, 6, 8)
    write_dataset(tmp_path / "d", {("P001", "t1", False): image}, label_mapping=mapping)
    with pytest.raises(ValueError, match=f"'{typo}' \\(id {IDS[closest]}\\): closest known: "
                                         f"{closest}"):
        build(tmp_path / "d", tmp_path / "tfds")
    builder = build(tmp_path / "d", tmp_path / "tfds", label_aliases={typo: closest})
    np.testing.assert_array_equal(rows(builder)["P001#t1"]["labels"],
                                  expected_labels(image["masks"]["semantic#primary"]))
    builder = build(tmp_path / "d", tmp_path / "tfds2", ignored_labels=(typo,))
    labels = rows(builder)["P001#t1"]["labels"]
    assert (labels[image["masks"]["semantic#primary"] == IDS[closest]] == 12).all()


def test_builds_killed_earlier_leave_no_incomplete_folders(tmp_path):
    rng = np.random.default_rng(6)
    write_dataset(tmp_path / "d", {("P001", "t1", False): random_image(rng, 6, 8)})
    version = data_builders.builder("pig", "tivita", data_dir=str(tmp_path)).version
    stale = tmp_path / "tfds" / "pig" / "tivita" / f"incomplete.AB12CD_{version}"
    stale.mkdir(parents=True)  # what a SIGKILLed build leaves
    builder = build(tmp_path / "d", tmp_path / "tfds")
    assert builder.is_prepared() and not stale.exists()
    assert not list((tmp_path / "tfds").glob("**/incomplete.*"))


def test_dsc_against_sto2_uses_the_vendors_sto2_when_the_data_has_it(tmp_path):
    from xeno_jax.data import Catalog
    from xeno_jax.spectra import sto2
    from xeno_jax.study.evaluation import score_images

    rng = np.random.default_rng(8)
    image = random_image(rng, 6, 8)
    image["masks"]["semantic#primary"][:] = IDS["kidney"]
    write_dataset(tmp_path / "plain", {("P001", "t1", False): image})
    vendor = {"StO2": np.full((6, 8), 0.375, np.float32), "NIR": np.zeros((6, 8), np.float32)}
    write_dataset(tmp_path / "vendor", {("P001", "t1", False): {**image, "params": vendor}})
    kidney = 6
    predict = lambda features: np.eye(12)[np.full(features.shape[:3], kidney)]
    for folder, expected_vendor in (("plain", 0.0), ("vendor", 1.0)):
        build(tmp_path / folder, tmp_path / f"tfds_{folder}")
        catalog = Catalog(["pig/tivita:physiological"], tmp_path / f"tfds_{folder}")
        table = score_images(catalog, catalog.records, predict, 1, metrics=("dice",))
        assert table.scores["vendor_sto2"].tolist() == [expected_vendor]
        median = table.scores["median_sto2"][0]
        if expected_vendor:
            assert median == 0.375
        else:
            cube = image["cube"].astype(np.float16).astype(np.float32)
            features = cube / np.abs(cube).sum(-1, keepdims=True)
            np.testing.assert_allclose(median, np.median(np.asarray(sto2(features))), rtol=1e-4)


def test_build_command_options_become_the_builders_real_data_options(monkeypatch):
    from data_builders.__main__ import take_real_data_options

    monkeypatch.setattr(SpeciesBuilder, "DEFAULT_REAL_DATA", RealDataOptions())
    argv = take_real_data_options(
        ["build", "data_builders/pig", "--config=tivita", "--skip_invalid",
         "--annotations=polygon#annotator1,semantic#primary", "--label_aliases=kidnee:kidney",
         "--ignored_label_ids=254,253", "--data_dir=/x"])
    assert argv == ["build", "data_builders/pig", "--config=tivita", "--data_dir=/x"]
    assert SpeciesBuilder.DEFAULT_REAL_DATA == RealDataOptions(
        annotations=("polygon#annotator1", "semantic#primary"), skip_invalid=True,
        label_aliases={"kidnee": "kidney"}, ignored_label_ids=(254, 253))
    with pytest.raises(ValueError, match="cube_source must be auto, L1 or dat"):
        take_real_data_options(["--cube_source=raw"])


# -- Apache Beam ---------------------------------------------------------------------------------

def test_beam_build_of_real_data_gives_the_local_examples(tmp_path, stored_examples):
    """The build command on Beam (DirectRunner, two worker processes, one element per image)
    stores exactly the local build's examples and metadata."""
    rng = np.random.default_rng(11)
    names = ("semantic#primary", "polygon#annotator1")
    images = {(f"P00{i}", f"t{i}", i == 4): random_image(rng, 6, 8, names) for i in range(1, 6)}
    images["P002", "t2", False]["meta"] = {"phase_type": "ischemia", "experiment": "kidney",
                                           "reperfused": True, "phase_time": 60}
    images["P003", "t3", False]["cube"][2, 2] = -0.5  # a warning, recorded in the metadata
    for image in images.values():
        image["params"] = {p: rng.uniform(0, 1, (6, 8)).astype(np.float32)
                           for p in ("StO2", "NIR")}
    write_dataset(tmp_path / "d", images)
    local = build(tmp_path / "d", tmp_path / "local", annotations=names)
    run("-m", "data_builders", "build", "data_builders/pig", "--config=tivita",
        f"--manual_dir={tmp_path / 'd'}", f"--data_dir={tmp_path / 'beam'}",
        "--file_format=array_record", f"--annotations={','.join(names)}",
        "--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,"
        "direct_running_mode=multi_processing")
    beam = tfds.builder("pig/tivita", data_dir=str(tmp_path / "beam"))
    expected = stored_examples(local)
    assert {k: len(v) for k, v in expected.items()} == {"malperfusion": 1, "physiological": 4}
    assert stored_examples(beam) == expected
    assert set(local.info.metadata["warnings"]) == {"P003#t3"}
    assert beam.info.metadata == local.info.metadata
    assert not list((tmp_path / "beam").glob(f"**/{CHECKS_FILE}"))


def test_beam_build_reports_every_bad_image_before_writing(tmp_path, stored_examples,
                                                           monkeypatch):
    """On Beam every image is checked before any example goes to the writer: the same one
    report, no dataset left; with skip_invalid the local build's examples and skipped images."""
    bad_dataset(tmp_path / "d", np.random.default_rng(4))
    events = tmp_path / "events.txt"  # what the (in-process) workers did, in order
    check, examples = tivita_data._check, tivita_data._checked_examples

    def logged_check(item, **kwargs):
        with events.open("a") as f:
            f.write(f"check {item[0].image_name}\n")
        return check(item, **kwargs)

    def logged_examples(item, **kwargs):
        for key, example in examples(item, **kwargs):
            with events.open("a") as f:
                f.write(f"example {key}\n")
            yield key, example

    monkeypatch.setattr(tivita_data, "_check", logged_check)
    monkeypatch.setattr(tivita_data, "_checked_examples", logged_examples)
    with pytest.raises(InvalidDataError) as local_error:
        build(tmp_path / "d", tmp_path / "local")
    with pytest.raises(InvalidDataError) as beam_error:
        build(tmp_path / "d", tmp_path / "beam", beam=True)
    assert "8 of 9 images" in str(local_error.value)
    assert str(local_error.value) in str(beam_error.value)
    # The five images that passed planning were checked (four bad cubes), none written.
    checked = [f"check P00{i}#t{i}" for i in (1, 2, 3, 4, 8)]
    assert sorted(events.read_text().splitlines()) == checked
    assert not list((tmp_path / "beam").glob("pig/tivita/[!.]*"))  # only the build lock
    events.unlink()
    local = build(tmp_path / "d", tmp_path / "local", skip_invalid=True)
    beam = build(tmp_path / "d", tmp_path / "beam", beam=True, skip_invalid=True)
    lines = events.read_text().splitlines()
    assert sorted(lines[:5]) == checked and lines[5:] == ["example P008#t8"]
    assert stored_examples(beam) == stored_examples(local)
    assert len(beam.info.metadata["skipped_images"]) == 8
    assert beam.info.metadata == local.info.metadata


def test_beam_builds_without_beam_name_the_extra(monkeypatch):
    from data_builders.__main__ import require_beam_if_asked

    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if not installed
    with pytest.raises(ImportError, match=r"the `beam` extra: pip install 'xeno_jax\[beam\]'"):
        data_builders.beam_options("runner=DirectRunner")
    with pytest.raises(SystemExit, match=r"--beam_pipeline_options: .*xeno_jax\[beam\]"):
        require_beam_if_asked(["build", "data_builders/pig",
                               "--beam_pipeline_options=runner=DirectRunner"])
    require_beam_if_asked(["build", "data_builders/pig"])  # a local build needs no Beam


def test_a_build_killed_at_a_random_point_leaves_nothing_used_and_rebuilds(tmp_path):
    rng = np.random.default_rng(9)
    images = {("P001", f"t{i}", False): random_image(rng, 60, 80) for i in range(6)}
    write_dataset(tmp_path / "d", images)
    data_dir = tmp_path / "tfds"
    command = [sys.executable, "-m", "data_builders", "build", "data_builders/pig",
               "--config=tivita", f"--manual_dir={tmp_path / 'd'}", f"--data_dir={data_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # Wait until TFDS has started writing (or finished), then kill at a random later moment.
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and not list(
            data_dir.glob("pig/tivita/incomplete.*")):
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    process.kill()
    process.wait()
    finished = data_dir / "pig" / "tivita" / str(SpeciesBuilder.VERSION) / "dataset_info.json"
    builder = tfds.builder("pig/tivita", data_dir=str(data_dir)) if finished.exists() else None
    if builder is not None:  # finished before the kill: then it is complete
        assert len(rows(builder)) == len(images)
    rebuilt = build(tmp_path / "d", data_dir)
    assert len(rows(rebuilt)) == len(images)
    assert not list(data_dir.glob("**/incomplete.*"))
