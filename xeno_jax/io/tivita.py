"""Tivita hyperspectral cubes (``*_SpecCube.dat``) and the reference implementation's layout.

A cube file is a big-endian int32 header with the stored shape (640, 480, 100 for the camera),
then big-endian float32 data in that shape. `read_cube` returns it as ``(height, width, channels)``
= (480, 640, 100) with ``out[y, x, c] = raw[x, H - 1 - y, c]``, as the reference does.

Dataset layout (htc ``DataPathMultiorgan``, method.md B3)::

  <root>/data/dataset_settings.json
  <root>/data/subjects/<subject>/<timestamp>/<timestamp>_SpecCube.dat
  <root>/data/overlap/<subject>/<timestamp>/...      (images shared with other datasets)
  <root>/intermediates/segmentations/<image_name>.blosc  {annotation_name: uint8[H, W]}
  <root>/intermediates/preprocessing/L1/<image_name>.blosc  float16[H, W, C] (optional)
  <root>/intermediates/preprocessing/parameter_images/<image_name>.blosc  {index: [H, W]} (opt.)

An image is named ``<subject>#<timestamp>`` (``<subject>#<timestamp>#overlap`` in the overlap
folder); a suffix ``@<annotation_name>`` selects its annotation, otherwise the settings'
``annotation_name_default`` does.

Bad data is found, not stored: `cube_problems` applies the reference's validity rules
(``DataPath.is_cube_valid``) and `label_table` refuses label names it does not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xeno_jax.io import atomic_write
from xeno_jax.io.htc import read_annotations, read_blosc, write_annotations
from xeno_jax.labels import SPECIES_12, LabelMapping

CUBE_SUFFIX = "_SpecCube.dat"
OVERLAP_SUFFIX = "#overlap"
FLOAT16_MAX = float(np.finfo(np.float16).max)
SETTINGS_FILE = "dataset_settings.json"
REQUIRED_SETTINGS = ("dataset_name", "label_mapping", "last_valid_label_index")
"""Keys every ``dataset_settings.json`` must have; ``annotation_name_default`` is optional."""

_HEADER_DTYPE = np.dtype(">i4")
_DATA_DTYPE = np.dtype(">f4")
_HEADER_BYTES = 3 * _HEADER_DTYPE.itemsize
_MAX_SIDE = 1 << 16  # no plausible cube has a larger side
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_cube_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """The ``(height, width, channels)`` of a cube file, from its header (checked as `read_cube`
    checks it)."""
    path = Path(path)
    with _open_cube(path) as (_, stored_shape):
        return stored_shape[1], stored_shape[0], stored_shape[2]


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
    with _open_cube(path) as (f, stored_shape):
        raw = np.fromfile(f, dtype=_DATA_DTYPE, count=math.prod(stored_shape))
    if raw.size != math.prod(stored_shape):
        raise ValueError(f"{path}: truncated while reading")
    image = np.swapaxes(np.flip(raw.reshape(stored_shape), axis=1), 0, 1)
    # A byte-swapping cast copies bits, so NaN payloads and signed zeros survive.
    return image.astype(np.float32, order="C")


@contextlib.contextmanager
def _open_cube(path: Path):
    """The open cube file, positioned after its checked header, and its stored shape."""
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
        yield f, stored_shape


def read_l1(image: TivitaImage) -> np.ndarray:
    """The reference's L1-normalised cube of an image (``float16 (height, width, channels)``).

    Raises:
      ValueError: naming the file if it is not one 3-D float16 array.
    """
    cube = read_blosc(image.l1_path)
    if not isinstance(cube, np.ndarray) or cube.ndim != 3 or cube.dtype != np.float16:
        got = (f"{cube.dtype} {cube.shape}" if isinstance(cube, np.ndarray)
               else f"a dict of {sorted(cube)}")
        raise ValueError(f"{image.l1_path}: expected one float16 (height, width, channels) "
                         f"array (method.md A5), got {got}")
    return cube


def read_parameter_images(image: TivitaImage) -> dict[str, np.ndarray]:
    """The vendor's parameter images of an image, ``{name: float (height, width)}``.

    Raises:
      ValueError: naming the file if it is not a dict of 2-D floating-point arrays.
    """
    data = read_blosc(image.parameter_path)
    if not isinstance(data, dict) or not data or not all(
            a.ndim == 2 and np.issubdtype(a.dtype, np.floating) for a in data.values()):
        raise ValueError(f"{image.parameter_path}: expected a dict of 2-D float arrays "
                         "{name: (height, width)}")
    return data


def cube_problems(cube: np.ndarray) -> tuple[list[str], list[str]]:
    """The reference's validity rules for a cube (htc ``DataPath.is_cube_valid``), plus float16.

    Errors (the cube must not be used): NaN or infinite values; pixels that are zero in every
    channel (their L1 normalisation is undefined); a cube that is negative everywhere; values
    beyond float16's range (+-65504), which would be stored as infinity. Warnings (the cube is
    used, as in the reference): pixels negative in every channel.

    Returns:
      ``(errors, warnings)``, each a list of short descriptions with counts.
    """
    cube = np.asarray(cube)
    errors, warnings = [], []
    # Two reductions find every problem (NaN propagates through min and max); exact counts are
    # computed only for a cube that has one.
    low, high = cube.min(axis=-1), cube.max(axis=-1)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        nan = int(np.isnan(cube).sum())
        errors.append(f"{nan} NaN and {int((~np.isfinite(cube)).sum()) - nan} infinite values")
    extremes = np.abs(np.stack([low, high]))
    if (extremes[np.isfinite(extremes)] > FLOAT16_MAX).any():
        magnitude = np.abs(np.where(np.isfinite(cube), cube, 0))
        errors.append(f"{int((magnitude > FLOAT16_MAX).sum())} values beyond the float16 range "
                      f"+-{FLOAT16_MAX:g} (largest magnitude {float(magnitude.max()):g})")
    zero_pixels = int(((low == 0) & (high == 0)).sum())
    if zero_pixels:
        errors.append(f"{zero_pixels} pixels are zero in every channel")
    if cube.size and (high < 0).all():
        errors.append("every value is negative")
    else:
        negative_pixels = int((high < 0).sum())
        if negative_pixels:
            warnings.append(f"{negative_pixels} pixels are negative in every channel")
    return errors, warnings


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
      image_name: ``<subject>#<timestamp>``, with ``#overlap`` for an image of the overlap folder.
      subject: subject folder name, e.g. ``P086``.
      timestamp: image folder name, e.g. ``2021_04_15_09_22_02``.
      cube_path: ``<root>/data/subjects/<subject>/<timestamp>/<timestamp>_SpecCube.dat``
        (``data/overlap/...`` for an overlap image).
      annotation_path: ``<root>/intermediates/segmentations/<image_name>.blosc``.
      annotation_name: the annotation an ``@<annotation_name>`` suffix selected, if any.
      overlap: the image lies in the ``overlap`` folder.
    """

    image_name: str
    subject: str
    timestamp: str
    cube_path: Path
    annotation_path: Path
    annotation_name: str | None = None
    overlap: bool = False

    @classmethod
    def at(cls, root: str | os.PathLike, subject: str, timestamp: str,
           annotation_name: str | None = None, overlap: bool = False) -> TivitaImage:
        """The image `subject`/`timestamp` of the dataset at `root` (which need not exist)."""
        root = Path(root)
        image_name = f"{subject}#{timestamp}{OVERLAP_SUFFIX if overlap else ''}"
        image_dir = root / "data" / ("overlap" if overlap else "subjects") / subject / timestamp
        return cls(
            image_name=image_name,
            subject=subject,
            timestamp=timestamp,
            cube_path=image_dir / f"{timestamp}{CUBE_SUFFIX}",
            annotation_path=root / "intermediates" / "segmentations" / f"{image_name}.blosc",
            annotation_name=annotation_name,
            overlap=overlap,
        )

    @classmethod
    def from_name(cls, root: str | os.PathLike, name: str) -> TivitaImage:
        """Parses ``<subject>#<timestamp>[#overlap][@<annotation_name>]``."""
        image_name, _, annotation_name = name.partition("@")
        overlap = image_name.endswith(OVERLAP_SUFFIX)
        subject, _, timestamp = image_name.removesuffix(OVERLAP_SUFFIX).partition("#")
        if not (_NAME_PATTERN.fullmatch(subject) and _NAME_PATTERN.fullmatch(timestamp)):
            raise ValueError(f"image name {name!r} is not "
                             "<subject>#<timestamp>[#overlap][@<annotation>]")
        return cls.at(root, subject, timestamp, annotation_name or None, overlap)

    @property
    def intermediates(self) -> Path:
        return self.annotation_path.parent.parent

    @property
    def l1_path(self) -> Path:
        """The reference's L1-normalised float16 cube (method.md A5), if it was computed."""
        return self.intermediates / "preprocessing" / "L1" / f"{self.image_name}.blosc"

    @property
    def parameter_path(self) -> Path:
        """The vendor's parameter images (StO2, NIR, TWI, ...), if they were exported."""
        return (self.intermediates / "preprocessing" / "parameter_images"
                / f"{self.image_name}.blosc")

    def folder_problem(self) -> str | None:
        """Why the subject or image folder name cannot name an image, or None."""
        for what, name in (("subject", self.subject), ("image", self.timestamp)):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                return f"the {what} folder name {name!a} is not valid UTF-8"
            if not _NAME_PATTERN.fullmatch(name):
                return (f"the {what} folder name {name!r} is not letters, digits, '_', '-' or "
                        "'.', starting with a letter or digit")
        return None


def discover_images(root: str | os.PathLike) -> list[TivitaImage]:
    """Every image folder ``<root>/data/{subjects,overlap}/<subject>/<timestamp>``, by name.

    Folders whose names cannot name an image (not UTF-8, say) are returned too: see
    `TivitaImage.folder_problem`.

    Raises:
      ValueError: if ``<root>/data/subjects`` is not a folder.
    """
    subjects_dir = Path(root) / "data" / "subjects"
    if not subjects_dir.is_dir():
        raise ValueError(f"{subjects_dir}: not found; expected the reference layout "
                         "<root>/data/subjects/<subject>/<timestamp>/<timestamp>_SpecCube.dat")
    overlap_dir = Path(root) / "data" / "overlap"
    images = [TivitaImage.at(root, subject.name, image_dir.name, overlap=overlap)
              for folder, overlap in ((subjects_dir, False), (overlap_dir, True))
              if folder.is_dir()
              for subject in _visible_folders(folder)
              for image_dir in _visible_folders(subject)]
    return sorted(images, key=lambda image: image.image_name)


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


OTHER_LABELS = (
    "unlabeled", "unsure", "ignore", "gallbladder", "bile_fluid", "heart", "bladder", "urine",
    "muscle", "bone", "cartilage", "tendon", "fat", "fat_subcutaneous", "fat_visceral", "blood",
    "major_vein", "vein", "artery", "aorta", "esophagus", "trachea", "thyroid", "diaphragm",
    "lymph_nodes", "ureter", "ovary", "uterus", "kidney_with_Gerotas_fascia", "tube", "fur",
)
"""Labels of the reference's datasets outside the 12 classes (method.md A7): they become the
invalid index without a word. Any other name that the target mapping does not know is refused
(`label_table`) unless it is mapped or ignored explicitly: a typo such as ``kidnee`` or ``Liver``
would otherwise silently turn organ pixels invalid."""


def label_table(label_mapping: Mapping[str, int], target: LabelMapping = SPECIES_12, *,
                aliases: Mapping[str, str] | None = None, ignored: Iterable[str] = (),
                ignored_ids: Iterable[int] = (), source: str = SETTINGS_FILE) -> np.ndarray:
    """Dataset label id -> `target` index, checking every name of the dataset's mapping.

    Args:
      label_mapping: the dataset's name -> id mapping (``dataset_settings.json``).
      target: the training label mapping.
      aliases: dataset name -> `target` name, for names spelt otherwise than `target` does.
      ignored: dataset names that become the invalid index (besides `OTHER_LABELS`).
      ignored_ids: ids that no name maps but that may occur in masks (they become invalid).
      source: where `label_mapping` comes from, for messages.

    Returns:
      int16 ``[256]``: the target index of every id; -1 for ids the mapping does not name.

    Raises:
      ValueError: listing every unknown name with the closest known names, or a bad alias.
    """
    aliases = dict(aliases or {})
    bad_aliases = {k: v for k, v in aliases.items() if v not in target.mapping}
    if bad_aliases:
        raise ValueError(f"label aliases {bad_aliases} map to names the {target.num_classes}-"
                         f"class mapping does not know; known: {sorted(target.mapping)}")
    skip = {*OTHER_LABELS, *ignored}
    known = sorted({*target.mapping, *OTHER_LABELS})
    unknown = [n for n in label_mapping if n not in target.mapping and n not in aliases
               and n not in skip]
    if unknown:
        close = {n: difflib.get_close_matches(n.lower(), known, n=3, cutoff=0.6) for n in unknown}
        lines = [f"{n!r} (id {label_mapping[n]}): " + (f"closest known: {', '.join(c)}" if c
                                                      else "no similar known name")
                 for n, c in close.items()]
        example = {unknown[0]: (close[unknown[0]] or ["kidney"])[0]}
        raise ValueError(
            f"{source}: {len(unknown)} label names are unknown, so their pixels would silently "
            "become invalid:\n  " + "\n  ".join(lines) + f"\nMap them (label_aliases, e.g. "
            f"{example}) or ignore them (ignored_labels).")
    table = np.full(256, -1, np.int16)
    table[list(ignored_ids)] = target.invalid_index
    for name, index in label_mapping.items():
        table[index] = target.name_to_index(aliases.get(name, name))
    return table


def mask_to_labels(mask: np.ndarray, table: np.ndarray, invalid_index: int
                   ) -> tuple[np.ndarray, str | None]:
    """Maps a mask of dataset ids through `label_table`'s table.

    Returns:
      int32 labels (unknown ids become the invalid index) and, if the mask holds ids the
      dataset's mapping does not name, a description of them.
    """
    labels = table[np.asarray(mask, np.uint8)].astype(np.int32)
    problem = None
    if (labels < 0).any():
        ids = np.unique(np.asarray(mask)[labels < 0]).tolist()
        problem = (f"label ids {ids} ({int((labels < 0).sum())} pixels) are not in the "
                   f"label_mapping of {SETTINGS_FILE} (map a name to them, or ignore them: "
                   "ignored_label_ids)")
        labels = np.where(labels < 0, invalid_index, labels)
    return labels, problem


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
