"""Tivita hyperspectral cubes (``*_SpecCube.dat``) and the reference implementation's layout.

A cube file is a big-endian int32 header with the stored shape (640, 480, 100 for the camera),
then big-endian float32 data in that shape. `read_cube` returns it as ``(height, width, channels)``
= (480, 640, 100) with ``out[y, x, c] = raw[x, H - 1 - y, c]``, as the reference does.

Dataset layout (htc ``DataPathMultiorgan``)::

  <root>/data/dataset_settings.json
  <root>/data/subjects/<subject>/<timestamp>/<timestamp>_SpecCube.dat
  <root>/intermediates/segmentations/<subject>#<timestamp>.blosc  {annotation_name: uint8[H, W]}

An image is named ``<subject>#<timestamp>``; a suffix ``@<annotation_name>`` selects its
annotation, otherwise the settings' ``annotation_name_default`` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xeno_jax.io import atomic_write
from xeno_jax.io.htc import read_annotations, write_annotations
from xeno_jax.labels import SPECIES_12, LabelMapping

CUBE_SUFFIX = "_SpecCube.dat"
SETTINGS_FILE = "dataset_settings.json"
REQUIRED_SETTINGS = ("dataset_name", "label_mapping", "last_valid_label_index")
"""Keys every ``dataset_settings.json`` must have; ``annotation_name_default`` is optional."""

_HEADER_DTYPE = np.dtype(">i4")
_DATA_DTYPE = np.dtype(">f4")
_HEADER_BYTES = 3 * _HEADER_DTYPE.itemsize
_MAX_SIDE = 1 << 16  # no plausible cube has a larger side
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_cube(path: str | os.PathLike) -> np.ndarray:
    """Reads a Tivita ``*_SpecCube.dat`` cube.

    Args:
      path: the cube file; any positive 3-D stored shape whose size matches the file is accepted.

    Returns:
      float32 ``(height, width, channels)``, (480, 640, 100) for the camera.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: naming the file, for a directory, a truncated file, an implausible header, or a
        file whose size does not match its header.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a Tivita {CUBE_SUFFIX} file")
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = f.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES:
            raise ValueError(f"{path}: truncated: {size} bytes, shorter than the "
                             f"{_HEADER_BYTES}-byte header of a Tivita cube")
        stored_shape = tuple(int(n) for n in np.frombuffer(header, _HEADER_DTYPE))
        if not all(0 < n <= _MAX_SIDE for n in stored_shape):
            raise ValueError(f"{path}: the header {stored_shape} is not a cube shape "
                             f"(three sides in 1..{_MAX_SIDE})")
        expected = _HEADER_BYTES + math.prod(stored_shape) * _DATA_DTYPE.itemsize
        if size != expected:
            problem = "truncated" if size < expected else "too long"
            raise ValueError(f"{path}: {problem}: the header gives the shape {stored_shape}, i.e. "
                             f"{expected} bytes, but the file has {size} bytes")
        raw = np.fromfile(f, dtype=_DATA_DTYPE, count=math.prod(stored_shape))
    if raw.size != math.prod(stored_shape):
        raise ValueError(f"{path}: truncated while reading")
    image = np.swapaxes(np.flip(raw.reshape(stored_shape), axis=1), 0, 1)
    # A byte-swapping cast copies bits, so NaN payloads and signed zeros survive.
    return image.astype(np.float32, order="C")


def write_cube(path: str | os.PathLike, cube: np.ndarray) -> None:
    """Writes a cube as a Tivita ``*_SpecCube.dat`` file, atomically: the inverse of `read_cube`.

    Args:
      path: the file to write (its folder must exist).
      cube: floating-point ``(height, width, channels)``; stored as float32, so a float32 cube
        round-trips bit for bit.
    """
    _write_stored(path, _stored_layout(path, cube))


@dataclasses.dataclass(frozen=True)
class TivitaImage:
    """One image of a reference-layout dataset.

    Attributes:
      image_name: ``<subject>#<timestamp>``.
      subject: subject folder name, e.g. ``P086``.
      timestamp: image folder name, e.g. ``2021_04_15_09_22_02``.
      cube_path: ``<root>/data/subjects/<subject>/<timestamp>/<timestamp>_SpecCube.dat``.
      annotation_path: ``<root>/intermediates/segmentations/<image_name>.blosc``.
      annotation_name: the annotation an ``@<annotation_name>`` suffix selected, if any.
    """

    image_name: str
    subject: str
    timestamp: str
    cube_path: Path
    annotation_path: Path
    annotation_name: str | None = None

    @classmethod
    def at(cls, root: str | os.PathLike, subject: str, timestamp: str,
           annotation_name: str | None = None) -> TivitaImage:
        """The image `subject`/`timestamp` of the dataset at `root` (which need not exist)."""
        root = Path(root)
        image_name = f"{subject}#{timestamp}"
        image_dir = root / "data" / "subjects" / subject / timestamp
        return cls(
            image_name=image_name,
            subject=subject,
            timestamp=timestamp,
            cube_path=image_dir / f"{timestamp}{CUBE_SUFFIX}",
            annotation_path=root / "intermediates" / "segmentations" / f"{image_name}.blosc",
            annotation_name=annotation_name,
        )

    @classmethod
    def from_name(cls, root: str | os.PathLike, name: str) -> TivitaImage:
        """Parses ``<subject>#<timestamp>[@<annotation_name>]``."""
        image_name, _, annotation_name = name.partition("@")
        subject, _, timestamp = image_name.partition("#")
        if not (_NAME_PATTERN.fullmatch(subject) and _NAME_PATTERN.fullmatch(timestamp)):
            raise ValueError(f"image name {name!r} is not <subject>#<timestamp>[@<annotation>]")
        return cls.at(root, subject, timestamp, annotation_name or None)


def discover_images(root: str | os.PathLike) -> list[TivitaImage]:
    """Every image folder ``<root>/data/subjects/<subject>/<timestamp>``, sorted by name.

    Raises:
      ValueError: if ``<root>/data/subjects`` is not a folder.
    """
    subjects_dir = Path(root) / "data" / "subjects"
    if not subjects_dir.is_dir():
        raise ValueError(f"{subjects_dir}: not found; expected the reference layout "
                         "<root>/data/subjects/<subject>/<timestamp>/<timestamp>_SpecCube.dat")
    return [TivitaImage.at(root, subject.name, image_dir.name)
            for subject in _visible_folders(subjects_dir)
            for image_dir in _visible_folders(subject)]


def find_missing_files(images: Iterable[TivitaImage], *, annotations: bool = True) -> list[Path]:
    """The cubes (and, if `annotations`, the annotation files) that do not exist, in order."""
    missing = []
    for image in images:
        wanted = (image.cube_path, image.annotation_path) if annotations else (image.cube_path,)
        missing.extend(path for path in wanted if not path.is_file())
    return missing


def read_dataset_settings(root: str | os.PathLike) -> dict[str, Any]:
    """Reads ``<root>/data/dataset_settings.json`` and checks its required keys.

    Raises:
      ValueError: naming the file and key if a required key is missing or has a wrong type.
    """
    path = Path(root) / "data" / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    _check_settings(path, settings)
    return settings


def write_dataset_settings(root: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Writes ``<root>/data/dataset_settings.json`` atomically, creating the folders."""
    path = Path(root) / "data" / SETTINGS_FILE
    _check_settings(path, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, text=True) as f:
        json.dump(dict(settings), f, indent=4, ensure_ascii=False)
        f.write("\n")


def write_image(root: str | os.PathLike, subject: str, timestamp: str, cube: np.ndarray,
                annotations: Mapping[str, np.ndarray] | None = None) -> TivitaImage:
    """Lays out one image as the reference does: its cube and, if given, its annotations.

    Args:
      root: dataset root; missing folders are created.
      subject: subject name, e.g. ``P086``.
      timestamp: image folder name, e.g. ``2021_04_15_09_22_02``.
      cube: floating-point ``(height, width, channels)``.
      annotations: ``{annotation_name: mask}``, integer masks of shape ``(height, width)`` with
        dataset label ids in 0..255; None writes no annotation file.

    Returns:
      The written image.
    """
    for what, name in (("subject", subject), ("timestamp", timestamp)):
        if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{what} {name!r} must be letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit")
    image = TivitaImage.at(root, subject, timestamp)
    raw = _stored_layout(image.cube_path, cube)
    width, height = raw.shape[:2]
    masks = None if annotations is None else {
        name: _as_mask(image.annotation_path, name, mask, (height, width))
        for name, mask in annotations.items()}
    image.cube_path.parent.mkdir(parents=True, exist_ok=True)
    _write_stored(image.cube_path, raw)
    if masks is not None:
        image.annotation_path.parent.mkdir(parents=True, exist_ok=True)
        write_annotations(image.annotation_path, masks)
    return image


def default_annotation_name(image: TivitaImage, settings: Mapping[str, Any]) -> str:
    """The annotation an image uses: its ``@`` suffix, else ``annotation_name_default``."""
    name = image.annotation_name or settings.get("annotation_name_default")
    if not name:
        raise ValueError(f"{image.image_name}: no annotation name; give the image name an "
                         f"'@<annotation_name>' suffix or set annotation_name_default in "
                         f"{SETTINGS_FILE}")
    return name


def read_annotation(image: TivitaImage, annotation_name: str) -> np.ndarray:
    """Reads one uint8 ``(height, width)`` mask of dataset label ids.

    Raises:
      ValueError: naming the file, the annotation and the ones it has, if it lacks that one.
    """
    masks = read_annotations(image.annotation_path)
    if annotation_name not in masks:
        raise ValueError(f"{image.annotation_path}: has no annotation {annotation_name!r}, only "
                         f"{sorted(masks)}")
    return masks[annotation_name]


def read_labels(image: TivitaImage, settings: Mapping[str, Any],
                label_mapping: LabelMapping = SPECIES_12) -> np.ndarray:
    """The image's default annotation as training indices of `label_mapping`.

    Dataset label ids are mapped by name (``settings["label_mapping"]``); ids and names the
    mapping does not know, e.g. 255 = unlabeled, become its invalid index.

    Returns:
      int32 ``(height, width)``.
    """
    mask = read_annotation(image, default_annotation_name(image, settings))
    return label_mapping.map_array(mask, settings["label_mapping"])


def _stored_layout(path: str | os.PathLike, cube: Any) -> np.ndarray:
    """Checks a cube and returns it as the file stores it: big-endian float32, (W, H, C)."""
    cube = np.asarray(cube)
    if cube.ndim != 3 or not all(0 < n <= _MAX_SIDE for n in cube.shape):
        raise ValueError(f"{path}: a cube must be (height, width, channels) with sides in "
                         f"1..{_MAX_SIDE}, got the shape {cube.shape}")
    if not np.issubdtype(cube.dtype, np.floating):
        raise ValueError(f"{path}: a cube must have a floating-point dtype, got {cube.dtype}")
    return np.ascontiguousarray(np.flip(np.swapaxes(cube, 0, 1), axis=1), dtype=_DATA_DTYPE)


def _write_stored(path: str | os.PathLike, raw: np.ndarray) -> None:
    with atomic_write(path) as f:
        f.write(np.asarray(raw.shape, dtype=_HEADER_DTYPE).tobytes())
        f.write(raw.data)


def _check_settings(path: Path, settings: Any) -> None:
    if not isinstance(settings, Mapping):
        raise ValueError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    for key in REQUIRED_SETTINGS:
        if key not in settings:
            raise ValueError(f"{path}: lacks the required key {key!r}")
    label_mapping = settings["label_mapping"]
    if not (isinstance(label_mapping, Mapping)
            and all(isinstance(n, str) and _is_label_id(i) for n, i in label_mapping.items())):
        raise ValueError(f"{path}: 'label_mapping' must map label names to ids in 0..255, got "
                         f"{label_mapping!r}")
    if not _is_label_id(settings["last_valid_label_index"]):
        raise ValueError(f"{path}: 'last_valid_label_index' must be an int in 0..255, got "
                         f"{settings['last_valid_label_index']!r}")
    default = settings.get("annotation_name_default")
    if default is not None and not isinstance(default, str):
        raise ValueError(f"{path}: 'annotation_name_default' must be a str, got {default!r}")


def _is_label_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


def _as_mask(path: Path, name: str, mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An integer label mask as uint8, checked against the cube's spatial shape."""
    mask = np.asarray(mask)
    if mask.shape != shape or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{path} [{name!r}]: an annotation must be an integer mask of the "
                         f"cube's shape {shape}, got {mask.dtype} with shape {mask.shape}")
    if mask.size and not 0 <= mask.min() <= mask.max() <= 255:
        raise ValueError(f"{path} [{name!r}]: label ids must lie in 0..255, got "
                         f"{mask.min()}..{mask.max()}")
    return mask.astype(np.uint8)


def _visible_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
