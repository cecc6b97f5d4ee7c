"""Tests for xeno_jax.io: Tivita cubes, the reference dataset layout and safe blosc files."""

import builtins
import os
import pickle
import re

import blosc
import numpy as np
import pytest

from xeno_jax.io import atomic_write
from xeno_jax.io.htc import read_annotations, read_blosc, write_annotations, write_blosc
from xeno_jax.io.tivita import (
    REQUIRED_SETTINGS,
    TivitaImage,
    default_annotation_name,
    discover_images,
    find_missing_files,
    read_annotation,
    read_cube,
    read_dataset_settings,
    read_labels,
    write_cube,
    write_dataset_settings,
    write_image,
)
from xeno_jax.labels import SPECIES_12

SPECIAL_FLOAT_BITS = (
    0x7F800001,  # signalling NaN
    0xFFC12345,  # negative quiet NaN with a payload
    0x80000000,  # -0.0
    0x7F800000,  # inf
    0x00000001,  # smallest subnormal
)


def _path_error(path) -> str:
    return re.escape(str(path))


def _float_bits(shape, seed) -> np.ndarray:
    """Random float32 bit patterns, the special ones first."""
    bits = np.random.default_rng(seed).integers(0, 2**32, size=shape, dtype=np.uint32)
    bits.flat[: len(SPECIAL_FLOAT_BITS)] = SPECIAL_FLOAT_BITS
    return bits


def _write_camera_file(path, raw_bits) -> None:
    """A cube file as the camera writes it: int32 shape, then the data, both big-endian."""
    path.write_bytes(np.asarray(raw_bits.shape, ">i4").tobytes()
                     + np.asarray(raw_bits, ">u4").tobytes())


def _write_reference_blosc(path, data, protocol=pickle.DEFAULT_PROTOCOL) -> None:
    """An independent writer of the reference format (htc's compress_file)."""
    def compress(array):
        return blosc.compress(array.tobytes(), typesize=array.dtype.itemsize, clevel=9,
                              cname="zstd", shuffle=blosc.SHUFFLE)

    if isinstance(data, dict):
        chunks = {key: compress(array) for key, array in data.items()}
        header = {key: (array.shape, array.dtype, len(chunks[key])) for key, array in data.items()}
        path.write_bytes(pickle.dumps(header, protocol=protocol) + b"".join(chunks.values()))
    else:
        path.write_bytes(pickle.dumps((data.shape, data.dtype), protocol=protocol) + compress(data))


# --- Tivita cubes -------------------------------------------------------------------------------


def test_read_cube_orientation_of_a_hand_built_file(tmp_path):
    width, height, channels = 4, 3, 2
    raw = np.array([[[100 * x + 10 * y + c for c in range(channels)] for y in range(height)]
                    for x in range(width)], np.float32)
    path = tmp_path / "t_SpecCube.dat"
    _write_camera_file(path, raw.view(np.uint32))

    cube = read_cube(path)

    assert cube.shape == (height, width, channels)
    assert cube.dtype == np.float32
    assert cube.flags.c_contiguous
    np.testing.assert_array_equal(cube[0, 0], [20, 21])  # raw[x=0, y=2]
    np.testing.assert_array_equal(cube[2, 3], [300, 301])  # raw[x=3, y=0]
    np.testing.assert_array_equal(cube[1, 2], [210, 211])  # raw[x=2, y=1]
    for y, x, c in np.ndindex(cube.shape):
        assert cube[y, x, c] == raw[x, height - 1 - y, c]


def test_write_then_read_cube_is_bit_identical(tmp_path):
    bits = _float_bits((5, 7, 3), seed=0)
    path = tmp_path / "t_SpecCube.dat"

    write_cube(path, bits.view(np.float32))

    np.testing.assert_array_equal(read_cube(path).view(np.uint32), bits)
    assert path.stat().st_size == 12 + 5 * 7 * 3 * 4


def test_read_then_write_cube_reproduces_the_file(tmp_path):
    original = tmp_path / "a_SpecCube.dat"
    _write_camera_file(original, _float_bits((7, 5, 3), seed=1))
    copy = tmp_path / "b_SpecCube.dat"

    write_cube(copy, read_cube(original))

    assert copy.read_bytes() == original.read_bytes()


def test_write_cube_stores_float64_as_float32(tmp_path):
    cube = np.random.default_rng(2).normal(size=(2, 3, 4))
    path = tmp_path / "t_SpecCube.dat"
    write_cube(path, cube)
    np.testing.assert_array_equal(read_cube(path), cube.astype(np.float32))


def _cube_file_bytes(shape=(4, 3, 2)) -> bytes:
    return np.asarray(shape, ">i4").tobytes() + np.zeros(shape, ">f4").tobytes()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (_cube_file_bytes()[:-1], "truncated"),
        (_cube_file_bytes()[:30], "truncated"),
        (_cube_file_bytes()[:5], "truncated"),
        (b"", "truncated"),
        (_cube_file_bytes() + b"\0", "too long"),
        (np.asarray([0, 3, 2], ">i4").tobytes(), "not a cube shape"),
        (np.asarray([-4, 3, 2], ">i4").tobytes() + bytes(96), "not a cube shape"),
        (np.asarray([2**31 - 1] * 3, ">i4").tobytes() + bytes(96), "not a cube shape"),
        (np.asarray([4, 3, 2], "<i4").tobytes() + bytes(96), "not a cube shape"),  # wrong endian
    ],
)
def test_read_cube_rejects_bad_files_naming_them(tmp_path, content, problem):
    path = tmp_path / "bad_SpecCube.dat"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=_path_error(path)) as error:
        read_cube(path)
    assert problem in str(error.value)


def test_read_cube_rejects_a_directory_and_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=_path_error(tmp_path) + ".*directory"):
        read_cube(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_cube(tmp_path / "missing_SpecCube.dat")


@pytest.mark.parametrize(
    "cube",
    [
        np.zeros((3, 4), np.float32),
        np.zeros((1, 3, 4, 2), np.float32),
        np.zeros((0, 4, 2), np.float32),
        np.zeros((3, 4, 2), np.int32),
        np.zeros((3, 4, 2), bool),
        np.zeros((3, 4, 2), np.complex64),
        np.full((3, 4, 2), None, object),
    ],
)
def test_write_cube_rejects_bad_input_and_keeps_the_old_file(tmp_path, cube):
    path = tmp_path / "t_SpecCube.dat"
    write_cube(path, np.ones((2, 2, 2), np.float32))
    before = path.read_bytes()

    with pytest.raises(ValueError, match=_path_error(path)):
        write_cube(path, cube)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]
    with pytest.raises(FileNotFoundError, match=_path_error(tmp_path / "missing")):
        write_cube(tmp_path / "missing" / "t_SpecCube.dat", np.ones((1, 1, 1), np.float32))


# --- blosc files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [bool, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.uint64, np.float16,
     np.float32, np.float64, np.complex64, np.complex128, ">f4", ">i8"],
)
def test_blosc_array_round_trip(tmp_path, dtype):
    raw = np.random.default_rng(3).integers(0, 256, size=(3, 4, 5, np.dtype(dtype).itemsize),
                                            dtype=np.uint8)
    array = raw.view(dtype)[..., 0] if np.dtype(dtype) != bool else raw[..., 0] % 2 == 1
    path = tmp_path / "a.blosc"

    write_blosc(path, array)
    back = read_blosc(path)

    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert back.tobytes() == array.tobytes()


def test_blosc_dict_round_trip_keeps_key_order(tmp_path):
    rng = np.random.default_rng(4)
    data = {
        "liver": rng.normal(size=(2, 100, 101)).astype(np.float32),
        "kidney": rng.integers(0, 255, (6, 8), dtype=np.uint8),
        "empty": np.zeros((0, 3), np.int64),
        "scalar": np.float64(2.5),
        "fortran": np.asfortranarray(rng.normal(size=(3, 5))),
    }
    path = tmp_path / "d.blosc"

    write_blosc(path, data)
    back = read_blosc(path)

    assert list(back) == list(data)
    for key, array in data.items():
        assert back[key].dtype == np.asarray(array).dtype
        np.testing.assert_array_equal(back[key], array)


def test_write_blosc_is_byte_identical_to_the_reference_writer(tmp_path):
    rng = np.random.default_rng(5)
    array = rng.normal(size=(4, 10, 11)).astype(np.float32)
    masks = {"semantic#primary": rng.integers(0, 20, (6, 8), dtype=np.uint8),
             "polygon#annotator1": rng.integers(0, 20, (6, 8), dtype=np.uint8)}
    for name, data in (("array", array), ("dict", masks)):
        ours, reference = tmp_path / f"ours_{name}.blosc", tmp_path / f"ref_{name}.blosc"
        write_blosc(ours, data)
        _write_reference_blosc(reference, data)
        assert ours.read_bytes() == reference.read_bytes()

    with (tmp_path / "ours_array.blosc").open("rb") as f:
        assert pickle.load(f) == (array.shape, array.dtype)  # trusted file: plain pickle is fine
        chunk = f.read()
    assert blosc.get_clib(chunk) == "Zstd"
    assert chunk[3] == array.dtype.itemsize  # typesize
    assert chunk[2] & 0x1  # byte shuffle
    assert blosc.decompress(chunk) == array.tobytes()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_read_blosc_loads_real_numpy_dtype_headers(tmp_path, protocol):
    array = np.arange(12, dtype=">u2").reshape(3, 4)
    single, multiple = tmp_path / "single.blosc", tmp_path / "dict.blosc"
    _write_reference_blosc(single, array, protocol)
    _write_reference_blosc(multiple, {"a": array, "b": array[:1].astype(np.float32)}, protocol)
    with single.open("rb") as f:
        assert b"dtype" in f.read()  # the header really pickles a numpy.dtype

    back = read_blosc(single)
    back_dict = read_blosc(multiple)

    assert back.dtype == np.dtype(">u2")
    np.testing.assert_array_equal(back, array)
    assert back_dict["b"].dtype == np.float32
    np.testing.assert_array_equal(back_dict["a"], array)


class _Shell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, marker):
        self.code = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def __reduce__(self):
        return builtins.eval, (self.code,)


class _Load:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return np.load, (self.path,)


def _pickled_header_file(path, header) -> None:
    chunk = blosc.compress(np.zeros(3, np.float32).tobytes(), typesize=4)
    path.write_bytes(pickle.dumps(header) + chunk)


def test_eval_payload_would_run_under_plain_pickle(tmp_path):
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_Eval(marker)))
    assert marker.exists()  # so the refusals below are refusals of a working exploit


@pytest.mark.parametrize(
    ("make_header", "refused"),
    [
        (lambda marker: ((3,), _Shell(f"touch {marker}")),
         f"{os.system.__module__}.{os.system.__name__}"),
        (lambda marker: {"a": ((3,), np.dtype(np.float32), 20), "b": _Eval(marker)},
         "builtins.eval"),
        (lambda marker: _Eval(marker), "builtins.eval"),
        (lambda marker: ((3,), _Load(str(marker))), "numpy.load"),
    ],
)
def test_read_blosc_refuses_code_in_the_header_and_never_runs_it(tmp_path, make_header, refused):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.blosc"
    _pickled_header_file(path, make_header(marker))

    with pytest.raises(ValueError, match=_path_error(path)) as error:
        read_blosc(path)

    assert refused in str(error.value)
    assert not marker.exists()


class _ForgedDtype:
    """Pickles as numpy.dtype('f4') with a forged state (the object flag set)."""

    def __reduce__(self):
        return np.dtype, ("f4", False, True), (3, "<", None, None, None, -1, -1, 63)


@pytest.mark.parametrize(
    "dtype",
    [np.dtype(object), np.dtype([("a", np.float32)]), np.dtype("U3"), np.dtype("datetime64[s]"),
     _ForgedDtype()],
)
def test_read_blosc_refuses_non_numeric_dtypes(tmp_path, dtype):
    path = tmp_path / "odd.blosc"
    _pickled_header_file(path, ((3,), dtype))
    with pytest.raises(ValueError, match=_path_error(path) + ".*refused.*numpy.dtype"):
        read_blosc(path)


def _valid_file_bytes(tmp_path) -> bytes:
    path = tmp_path / "valid.blosc"
    write_blosc(path, {"a": np.arange(50, dtype=np.float32), "b": np.ones((4, 4), np.uint8)})
    return path.read_bytes()


F32 = np.dtype(np.float32)
CHUNK = blosc.compress(np.arange(3, dtype=np.float32).tobytes(), typesize=4)  # 3 float32


def _header_with_chunk(header) -> bytes:
    return pickle.dumps(header) + CHUNK


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (lambda valid: valid[:-10], "truncated"),
        (lambda valid: valid[:40], "does not unpickle"),
        (lambda valid: valid[:150], "truncated: ['a']"),
        (lambda valid: valid + b"tail", "bytes follow"),
        (lambda valid: b"", "does not unpickle"),
        (lambda valid: b"not a pickle at all", "does not unpickle"),
        (lambda valid: _header_with_chunk(((4,), F32)), "need 16 bytes"),
        (lambda valid: _header_with_chunk(((3,), F32))[:-2], "truncated"),
        (lambda valid: _header_with_chunk(((3,), F32)) + b"x", "corrupt"),
        (lambda valid: _header_with_chunk(((3,), "float32")), "not a numpy.dtype"),
        (lambda valid: _header_with_chunk(((-3,), F32)), "shape"),
        (lambda valid: _header_with_chunk(((3.0,), F32)), "shape"),
        (lambda valid: _header_with_chunk([(3,), F32]), "header is a list"),
        (lambda valid: _header_with_chunk({"a": ((3,), F32, len(CHUNK) + 1)}), "truncated"),
        (lambda valid: _header_with_chunk({"a": ((3,), F32, len(CHUNK))}) + b"xy", "2 bytes"),
        (lambda valid: _header_with_chunk({"a": ((3,), F32, len(CHUNK) - 1)}), "corrupt"),
        (lambda valid: _header_with_chunk({"a": ((3,), F32, -1)}), "compressed size"),
        (lambda valid: _header_with_chunk({"a": ((3,), F32)}), "entry"),
        (lambda valid: _header_with_chunk({1: ((3,), F32, len(CHUNK))}), "key"),
    ],
)
def test_read_blosc_rejects_corrupt_files_naming_them(tmp_path, corrupt, problem):
    path = tmp_path / "corrupt.blosc"
    path.write_bytes(corrupt(_valid_file_bytes(tmp_path)))
    with pytest.raises(ValueError, match=_path_error(path)) as error:
        read_blosc(path)
    assert problem in str(error.value)


def test_read_blosc_rejects_a_directory(tmp_path):
    with pytest.raises(ValueError, match=_path_error(tmp_path) + ".*directory"):
        read_blosc(tmp_path)


def test_write_blosc_rejects_unsupported_data_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.blosc"
    write_blosc(path, np.ones(3))
    before = path.read_bytes()
    for bad in (np.array(["text"]), np.array([None]), {1: np.ones(2)},
                {"a": np.ones(2), "b": np.zeros(2, [("x", "f4")])}):
        with pytest.raises(ValueError, match=_path_error(path)):
            write_blosc(path, bad)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.blosc"]


def test_read_annotations_requires_a_dict_of_uint8_masks(tmp_path):
    masks = {"semantic#primary": np.arange(12, dtype=np.uint8).reshape(3, 4)}
    good, single, floats = tmp_path / "good.blosc", tmp_path / "single.blosc", tmp_path / "f.blosc"
    write_annotations(good, masks)
    write_blosc(single, masks["semantic#primary"])
    write_blosc(floats, {"semantic#primary": np.zeros((3, 4), np.float32)})

    np.testing.assert_array_equal(read_annotations(good)["semantic#primary"],
                                  masks["semantic#primary"])
    with pytest.raises(ValueError, match=_path_error(single) + ".*single array"):
        read_annotations(single)
    with pytest.raises(ValueError, match=_path_error(floats) + ".*semantic#primary.*uint8"):
        read_annotations(floats)


# --- dataset layout -----------------------------------------------------------------------------

SETTINGS = {
    "dataset_name": "2099_01_01_tiny",
    "label_mapping": {"background": 0, "kidney": 1, "gallbladder": 2, "unlabeled": 255},
    "last_valid_label_index": 2,
    "annotation_name_default": "semantic#primary",
}
IMAGES = (("P002", "2021_01_02_10_00_00"), ("P001", "2021_01_01_10_00_05"),
          ("P001", "2021_01_01_10_00_01"))


@pytest.fixture
def dataset(tmp_path):
    """A reference-layout dataset of three images; returns (root, {image_name: (cube, masks)})."""
    rng = np.random.default_rng(6)
    write_dataset_settings(tmp_path, SETTINGS)
    written = {}
    for subject, timestamp in IMAGES:
        cube = rng.normal(size=(3, 4, 5)).astype(np.float32)
        masks = {"semantic#primary": rng.choice([0, 1, 2, 255], size=(3, 4)).astype(np.uint8),
                 "polygon#annotator1": rng.integers(0, 3, (3, 4))}
        image = write_image(tmp_path, subject, timestamp, cube, masks)
        written[image.image_name] = (cube, masks)
    return tmp_path, written


def test_layout_writer_discover_and_read_back(dataset):
    root, written = dataset

    images = discover_images(root)

    assert [image.image_name for image in images] == [
        "P001#2021_01_01_10_00_01", "P001#2021_01_01_10_00_05", "P002#2021_01_02_10_00_00"]
    first = images[0]
    assert (first.subject, first.timestamp) == ("P001", "2021_01_01_10_00_01")
    assert first.cube_path == (root / "data/subjects/P001/2021_01_01_10_00_01"
                               / "2021_01_01_10_00_01_SpecCube.dat")
    assert first.annotation_path == (root / "intermediates/segmentations"
                                     / "P001#2021_01_01_10_00_01.blosc")
    for image in images:
        cube, masks = written[image.image_name]
        np.testing.assert_array_equal(read_cube(image.cube_path), cube)
        annotations = read_annotations(image.annotation_path)
        assert list(annotations) == list(masks)
        for name, mask in masks.items():
            assert annotations[name].dtype == np.uint8
            np.testing.assert_array_equal(annotations[name], mask)
    assert read_dataset_settings(root) == SETTINGS
    assert find_missing_files(images) == []


def test_discover_ignores_hidden_entries_and_needs_the_subjects_folder(dataset, tmp_path_factory):
    root, _ = dataset
    (root / "data/subjects/.cache").mkdir()
    (root / "data/subjects/P001/.partial").mkdir()
    (root / "data/subjects/notes.txt").write_text("not an image")
    assert len(discover_images(root)) == len(IMAGES)

    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match=_path_error(empty / "data" / "subjects")):
        discover_images(empty)


def test_find_missing_files_lists_every_missing_file(dataset):
    root, _ = dataset
    write_image(root, "P003", "2021_01_03_10_00_00", np.ones((3, 4, 5), np.float32))
    images = discover_images(root)
    images[0].cube_path.unlink()
    images[1].annotation_path.unlink()

    assert find_missing_files(images) == [
        images[0].cube_path, images[1].annotation_path, images[3].annotation_path]
    assert find_missing_files(images, annotations=False) == [images[0].cube_path]


@pytest.mark.parametrize("key", REQUIRED_SETTINGS)
def test_read_dataset_settings_names_the_file_and_a_missing_key(tmp_path, key):
    path = tmp_path / "data" / "dataset_settings.json"
    path.parent.mkdir()
    path.write_text(str({k: v for k, v in SETTINGS.items() if k != key}).replace("'", '"'))
    with pytest.raises(ValueError, match=_path_error(path) + f".*{key}"):
        read_dataset_settings(tmp_path)


@pytest.mark.parametrize(
    "change",
    [{"label_mapping": {"kidney": 256}}, {"label_mapping": ["kidney"]},
     {"last_valid_label_index": "2"}, {"annotation_name_default": 3}],
)
def test_write_dataset_settings_rejects_bad_values(tmp_path, change):
    with pytest.raises(ValueError, match=re.escape(next(iter(change)))):
        write_dataset_settings(tmp_path, SETTINGS | change)
    assert not (tmp_path / "data").exists()


def test_read_dataset_settings_rejects_invalid_json(tmp_path):
    path = tmp_path / "data" / "dataset_settings.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(ValueError, match=_path_error(path)):
        read_dataset_settings(tmp_path)


def test_annotation_comes_from_the_name_suffix_or_the_settings_default(dataset):
    root, written = dataset
    name = "P001#2021_01_01_10_00_01"
    plain = TivitaImage.from_name(root, name)
    chosen = TivitaImage.from_name(root, f"{name}@polygon#annotator1")

    assert plain == discover_images(root)[0]
    assert chosen.image_name == name and chosen.annotation_path == plain.annotation_path
    assert default_annotation_name(plain, SETTINGS) == "semantic#primary"
    assert default_annotation_name(chosen, SETTINGS) == "polygon#annotator1"
    np.testing.assert_array_equal(read_annotation(chosen, "polygon#annotator1"),
                                  written[name][1]["polygon#annotator1"])
    no_default = {k: v for k, v in SETTINGS.items() if k != "annotation_name_default"}
    with pytest.raises(ValueError, match=re.escape(name) + ".*annotation_name_default"):
        default_annotation_name(plain, no_default)
    with pytest.raises(ValueError, match=_path_error(plain.annotation_path) + ".*'semantic#x'"):
        read_annotation(plain, "semantic#x")
    for bad in ("P001", "P001#", "#2021", "P0/1#2021", "P001#../2021"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            TivitaImage.from_name(root, bad)


def test_read_labels_maps_dataset_ids_to_species_12_by_name(dataset):
    root, written = dataset
    name = "P002#2021_01_02_10_00_00"
    masks = written[name][1]
    to_species_12 = {0: 0, 1: SPECIES_12.name_to_index("kidney"), 2: 12, 255: 12}

    labels = read_labels(TivitaImage.from_name(root, name), SETTINGS)
    polygon = read_labels(TivitaImage.from_name(root, f"{name}@polygon#annotator1"), SETTINGS)

    assert to_species_12[1] == 6
    np.testing.assert_array_equal(
        labels, np.vectorize(to_species_12.get)(masks["semantic#primary"]))
    np.testing.assert_array_equal(
        polygon, np.vectorize(to_species_12.get)(masks["polygon#annotator1"]))


@pytest.mark.parametrize(
    ("subject", "timestamp", "annotations", "problem"),
    [
        ("P0/01", "2021_01_01", None, "subject"),
        ("P001", "..", None, "timestamp"),
        ("P001", "2021#01", None, "timestamp"),
        ("P001", "2021_01_01", {"a": np.zeros((4, 3), np.uint8)}, "shape"),
        ("P001", "2021_01_01", {"a": np.zeros((3, 4), np.float32)}, "integer"),
        ("P001", "2021_01_01", {"a": np.full((3, 4), 256)}, "0..255"),
    ],
)
def test_write_image_rejects_bad_input_and_writes_nothing(tmp_path, subject, timestamp,
                                                          annotations, problem):
    with pytest.raises(ValueError, match=problem):
        write_image(tmp_path, subject, timestamp, np.ones((3, 4, 2), np.float32), annotations)
    assert list(tmp_path.iterdir()) == []


def test_cube_problems_follow_the_reference_validity_rules():
    from xeno_jax.io.tivita import cube_problems

    cube = np.full((3, 4, 5), 0.5, np.float32)
    assert cube_problems(cube) == ([], [])
    negative = cube.copy()
    negative[1, 2] = -0.1  # a negative pixel: used, with a warning (as the reference)
    assert cube_problems(negative) == ([], ["1 pixels are negative in every channel"])
    assert cube_problems(-cube)[0] == ["every value is negative"]
    bad = cube.copy()
    bad[0, 0, 0], bad[0, 1, 1], bad[2, 3] = np.nan, -np.inf, 0
    bad[1, 1, 1] = -7e4
    errors, _ = cube_problems(bad)
    assert errors == ["1 NaN and 1 infinite values",
                      "1 values beyond the float16 range +-65504 (largest magnitude 70000)",
                      "1 pixels are zero in every channel"]


def test_label_table_maps_by_name_and_refuses_unknown_names():
    from xeno_jax.io.tivita import label_table, mask_to_labels

    table = label_table({"background": 0, "meso": 5, "heart": 8, "unlabeled": 255},
                        ignored_ids=(254,))
    labels, problem = mask_to_labels(np.array([[0, 5, 8], [255, 254, 17]]), table, 12)
    np.testing.assert_array_equal(labels, [[0, 2, 12], [12, 12, 12]])
    assert problem.startswith("label ids [17] (1 pixels) are not in the label_mapping")
    with pytest.raises(ValueError, match=r"'Kidney' \(id 3\): closest known: kidney") as error:
        label_table({"Kidney": 3, "spleen_x": 4, "zzz": 9})
    assert "'zzz' (id 9): no similar known name" in str(error.value)
    with pytest.raises(ValueError, match=re.escape("label aliases {'a': 'kidnee'}")):
        label_table({"a": 3}, aliases={"a": "kidnee"})
