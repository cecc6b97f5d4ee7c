"""The ``tivita`` config's build: real data in the reference (htc) layout, checked before use.

A build plans every image first (cheap: file names, cube headers, annotations, meta files), then
writes the splits, reading each cube once. Bad data is never stored: an image with a problem
(the reference's cube validity rules, `tivita.cube_problems`; annotations of another size or
without the requested annotation; label ids the dataset's mapping does not name; missing files;
a folder name that is not UTF-8; a bad meta file) is left out of the splits, and all problems
go into one report. Policy: the build then fails with that report (after every image has been
checked), so TFDS removes its unfinished folder and no dataset is left; with ``skip_invalid``
it finishes without those images and records them, with their problems, in the dataset's
metadata (``skipped_images``). Problems of the whole dataset fail at once: unknown label names
(`tivita.label_table`), cubes of several sizes.

The cube is the reference's L1 file (``intermediates/preprocessing/L1``, float16) when every
image has one and ``cube_source`` is ``auto`` (or ``L1``), else the ``.dat`` cube; the choice is
the metadata's ``cube_source``.

On Apache Beam (`beam_splits`) the policy is the same: every image is checked on the workers
before any example is made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

import data_builders
from xeno_jax.io import tivita
from xeno_jax.labels import SPECIES_12

NUM_BANDS = 100

# Reference phase types (htc tables.ischemic_table) and other metadata values -> split names.
STATE_ALIASES = {
    "physiological": "physiological",
    "baseline": "physiological",
    "ischemia": "malperfusion",
    "avascular": "malperfusion",
    "stasis": "malperfusion",
    "malperfused": "malperfusion",
    "malperfusion": "malperfusion",
    "icg": "icg",
    "venous_congestion": "venous_congestion",
}


NO_PARAMETER_IMAGES = np.full((1, 1, 2), np.nan, np.float16)
"""``parameter_images`` of a dataset without them: TFDS 4.9 can store no empty array (nor read
back one of shape (1, 1, 1))."""


@dataclasses.dataclass(frozen=True)
class RealDataOptions:
    """Options of a real-data build (command line: `parse_options`).

    Attributes:
      images: image names to build (``<subject>#<timestamp>[#overlap][@<annotation>]``);
        empty: every image folder.
      annotations: annotation names to keep (``annotation_labels``); the first gives ``labels``.
        Empty: each image's ``@`` suffix or the settings' ``annotation_name_default``.
      cube_source: ``auto`` (the L1 files if every image has one, else ``.dat``), ``L1``, ``dat``.
      label_aliases: dataset label name -> 12-class name (`tivita.label_table`).
      ignored_labels: dataset label names that become invalid (besides `tivita.OTHER_LABELS`).
      ignored_label_ids: ids no name maps that may occur in masks (they become invalid).
      skip_invalid: build without bad images (recorded in the metadata) instead of failing.
    """

    images: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()
    cube_source: str = "auto"
    label_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignored_labels: tuple[str, ...] = ()
    ignored_label_ids: tuple[int, ...] = ()
    skip_invalid: bool = False

    def __post_init__(self):
        if self.cube_source not in ("auto", "L1", "dat"):
            raise ValueError(f"cube_source must be auto, L1 or dat, got {self.cube_source!r}")


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RealDataOptions))


def parse_options(options: Mapping[str, str]) -> RealDataOptions:
    """Command-line text -> options: comma lists, ``name:12_class_name`` pairs, true/false."""
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown real-data options {sorted(unknown)}; known: {OPTION_NAMES}")
    values: dict[str, Any] = {}
    for key, text in options.items():
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        if key == "skip_invalid":
            if str(text).lower() not in ("true", "false", "1", "0", ""):
                raise ValueError(f"skip_invalid must be true or false, got {text!r}")
            values[key] = str(text).lower() in ("true", "1", "")
        elif key == "cube_source":
            values[key] = str(text)
        elif key == "label_aliases":
            pairs = [item.partition(":") for item in items]
            bad = [a for a, sep, b in pairs if not (a and sep and b)]
            if bad:
                raise ValueError(f"label_aliases: expected name:12_class_name pairs, got {bad}")
            values[key] = {a: b for a, _, b in pairs}
        elif key == "ignored_label_ids":
            values[key] = tuple(int(i) for i in items)
        else:
            values[key] = tuple(items)
    return RealDataOptions(**values)


class InvalidDataError(ValueError):
    """Images of a real dataset failed the checks; the message lists every one and why."""


@dataclasses.dataclass(frozen=True)
class Meta:
    """What an image's ``annotations/<timestamp>_meta.json`` says (README: what maps to what)."""

    perfusion_state: str = "physiological"
    experiment: str = "semantic"
    phase_type: str = ""
    clamping_location: str = ""
    reperfused: int = -1  # -1 unknown, 0 no, 1 yes
    phase_time: float = math.nan
    icg_dose: float = math.nan
    icg_time: float = math.nan

    def features(self) -> dict[str, Any]:
        return {"phase_type": self.phase_type, "clamping_location": self.clamping_location,
                "reperfused": np.int8(self.reperfused), "phase_time": np.float32(self.phase_time),
                "icg_dose": np.float32(self.icg_dose), "icg_time": np.float32(self.icg_time)}


def read_meta(image: tivita.TivitaImage) -> Meta:
    """An image's meta file (optional: without it, a physiological ``semantic`` image).

    Raises:
      ValueError: naming the file and key, for invalid JSON, an unknown phase type or a value of
        the wrong type.
    """
    path = image.cube_path.parent / "annotations" / f"{image.timestamp}_meta.json"
    if not path.exists():
        return Meta()
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    phase_type = meta.get("phase_type", "")
    raw = meta.get("perfusion_state", phase_type or "physiological")
    if raw not in STATE_ALIASES:
        raise ValueError(f"{path}: unknown perfusion state {raw!r}; known: {sorted(STATE_ALIASES)}")

    def value(key, kind, default):
        v = meta.get(key, default)
        if v is None:
            return default
        ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
        if not ok:
            raise ValueError(f"{path}: {key!r} must be {kind.__name__}, got {v!r}")
        return v

    reperfused = value("reperfused", bool, None)
    return Meta(
        perfusion_state=STATE_ALIASES[raw], experiment=str(meta.get("experiment", "semantic")),
        phase_type=str(phase_type), clamping_location=value("clamping_location", str, ""),
        reperfused=-1 if reperfused is None else int(reperfused),
        phase_time=float(value("phase_time", int | float, math.nan)),
        icg_dose=float(value("icg_dose", int | float, math.nan)),
        icg_time=float(value("icg_time", int | float, math.nan)))


@dataclasses.dataclass
class Plan:
    """What a real-data build will write, and what is wrong with the data.

    Attributes:
      images: every image with its meta data, in name order (without those whose files,
        folder name or meta file are bad).
      problems: image name -> problems (found in planning, then while writing the cubes).
      warnings: image name -> warnings (images that are used all the same).
      size: ``(height, width)`` of every cube.
      cube_source: ``L1`` or ``dat``.
      annotation_names: the annotations kept (``annotation_labels``), the first gives ``labels``.
      parameter_names: the vendor's parameter images kept (``parameter_images``), or none.
      table: dataset label id -> 12-class index (-1 unknown), `tivita.label_table`.
      splits_left: splits still to write (the last one to finish reports the problems).
    """

    root: Path
    images: list[tuple[tivita.TivitaImage, Meta]]
    problems: dict[str, list[str]]
    warnings: dict[str, list[str]]
    size: tuple[int, int]
    cube_source: str
    annotation_names: tuple[str, ...]
    parameter_names: tuple[str, ...]
    table: np.ndarray
    skip_invalid: bool
    num_found: int = 0
    splits_left: set[str] = dataclasses.field(default_factory=set)

    @property
    def splits(self) -> list[str]:
        return sorted({meta.perfusion_state for image, meta in self.images
                       if image.image_name not in self.problems} or {"physiological"})

    def metadata(self) -> dict[str, Any]:
        """What the dataset's metadata records about the build."""
        return {"image_size": list(self.size), "cube_source": self.cube_source,
                "annotation_names": list(self.annotation_names),
                "parameter_names": list(self.parameter_names),
                "skipped_images": dict(sorted(self.problems.items())),
                "warnings": dict(sorted(self.warnings.items()))}

    def record(self, name: str, problems: Sequence[str], warnings: Sequence[str]) -> None:
        """Adds an image's problems and warnings."""
        if warnings:
            self.warnings[name] = list(warnings)
        if problems:
            self.problems.setdefault(name, []).extend(problems)

    def fail_or_warn(self) -> None:
        """After every image is checked: the report raised (logged with ``skip_invalid``).

        Raises:
          InvalidDataError: if an image has problems and ``skip_invalid`` is not set.
        """
        if not self.problems:
            return
        if not self.skip_invalid:
            raise InvalidDataError(self.report())
        logging.warning("%s", self.report(skipped=True))

    def report(self, skipped: bool = False) -> str:
        """Every bad image and why: invalid, or `skipped` (with ``skip_invalid``)."""
        lines = [f"{name}: {'; '.join(problems)}"
                 for name, problems in sorted(self.problems.items())]
        what = ("were skipped (the metadata's skipped_images)" if skipped else
                "are invalid (build with skip_invalid to leave them out and record them)")
        return (f"{len(self.problems)} of {self.num_found} images of {self.root} {what}:\n  "
                + "\n  ".join(lines))


def plan_build(root: Path, options: RealDataOptions = RealDataOptions()) -> Plan:
    """Checks everything but the cube values; see the module docstring.

    Args:
      root: the dataset (``manual_dir``).
      options: what to build.

    Raises:
      ValueError: for problems of the whole dataset (settings, unknown label names, mixed
        cube sizes, no images).
    """
    images, annotations = options.images, options.annotations
    settings = tivita.read_dataset_settings(root)
    table = tivita.label_table(settings["label_mapping"], SPECIES_12,
                               aliases=options.label_aliases, ignored=options.ignored_labels,
                               ignored_ids=options.ignored_label_ids,
                               source=str(root / "data" / tivita.SETTINGS_FILE))
    found = ([tivita.TivitaImage.from_name(root, n) for n in images] if images
             else tivita.discover_images(root))
    if not found:
        raise ValueError(f"{root}: no images found under data/subjects")
    problems: dict[str, list[str]] = {}
    planned, shapes = [], {}
    for image in found:
        name = image.image_name
        try:
            problem = image.folder_problem()
            if problem:
                name = ascii(name)
                raise ValueError(problem)
            meta = read_meta(image)
            shape = tivita.read_cube_shape(image.cube_path)
            if shape[2] != NUM_BANDS:
                raise ValueError(f"{image.cube_path}: {shape[2]} channels, expected {NUM_BANDS}")
        except (OSError, ValueError) as e:
            problems.setdefault(name, []).append(_short(e))
            continue
        shapes[name] = shape
        planned.append((image, meta))
    sizes = Counter(shape[:2] for shape in shapes.values())
    if len(sizes) > 1:
        listing = "; ".join(f"{h} x {w}: {n} images, e.g. "
                            f"{next(k for k, s in shapes.items() if s[:2] == (h, w))}"
                            for (h, w), n in sizes.most_common())
        raise ValueError(f"{root}: the cubes have {len(sizes)} sizes ({listing}); a dataset "
                         "needs one size: build the sizes as separate datasets (images=...)")
    size = next(iter(sizes)) if sizes else (0, 0)
    names = tuple(annotations) or (None,)
    for image, _ in planned:
        for problem in _annotation_problems(image, settings, names, size, table):
            problems.setdefault(image.image_name, []).append(problem)
    good = [image for image, _ in planned if image.image_name not in problems]
    has_l1 = [image.l1_path.is_file() for image in good]
    chosen = {"auto": "L1" if good and all(has_l1) else "dat"}.get(options.cube_source,
                                                                  options.cube_source)
    if chosen == "L1":
        for image, present in zip(good, has_l1, strict=True):
            if not present:
                problems.setdefault(image.image_name, []).append(
                    f"{image.l1_path}: missing (cube_source=L1)")
    parameter_names: tuple[str, ...] = ()
    if good and all(image.parameter_path.is_file() for image in good):
        try:
            parameter_names = tuple(sorted(tivita.read_parameter_images(good[0])))
        except ValueError as e:
            problems.setdefault(good[0].image_name, []).append(_short(e))
    default = settings.get("annotation_name_default") or ""
    return Plan(root=root, images=planned, problems=problems, warnings={}, size=size,
                cube_source=chosen, table=table, skip_invalid=options.skip_invalid,
                num_found=len(found), annotation_names=tuple(annotations) or (default,),
                parameter_names=parameter_names)


def primary_annotation(image: tivita.TivitaImage, names: Sequence[str | None],
                       settings: Mapping[str, Any]) -> str:
    """The annotation of ``labels``: the image name's ``@`` suffix, else the first requested
    name, else the settings' ``annotation_name_default``."""
    if image.annotation_name or not names or not names[0]:
        return tivita.default_annotation_name(image, settings)
    return names[0]


def _annotation_problems(image: tivita.TivitaImage, settings: Mapping[str, Any],
                         names: Sequence[str | None], size: tuple[int, int],
                         table: np.ndarray) -> list[str]:
    """The problems of an image's annotations: missing, another size, unknown label ids."""
    try:
        masks = tivita.read_annotations(image.annotation_path)
        primary = primary_annotation(image, names, settings)
    except (OSError, ValueError) as e:
        return [_short(e)]
    problems = []
    if primary not in masks:
        problems.append(f"{image.annotation_path}: has no annotation {primary!r}, only "
                        f"{sorted(masks)}")
    for name in {primary, *[n for n in names if n]} & set(masks):
        mask = masks[name]
        if mask.shape != size:
            problems.append(f"{image.annotation_path} [{name!r}]: annotation of size "
                            f"{mask.shape[0]} x {mask.shape[1]}, the cube is {size[0]} x {size[1]}")
            continue
        _, unknown = tivita.mask_to_labels(mask, table, SPECIES_12.invalid_index)
        if unknown:
            problems.append(f"{image.annotation_path} [{name!r}]: {unknown}")
    return problems


def generate_split(plan: Plan, split: str, settings: Mapping[str, Any]
                   ) -> Iterator[tuple[str, dict]]:
    """The examples of one split; images with problems are left out and reported."""
    for image, meta in plan.images:
        if meta.perfusion_state != split or image.image_name in plan.problems:
            continue
        example, problems, warnings = read_image(plan, image, meta, settings)
        plan.record(image.image_name, problems, warnings)
        if example is not None:
            yield image.image_name, example
    plan.splits_left.discard(split)
    if not plan.splits_left:
        plan.fail_or_warn()


def read_image(plan: Plan, image: tivita.TivitaImage, meta: Meta, settings: Mapping[str, Any]
               ) -> tuple[dict | None, list[str], list[str]]:
    """Reads and checks one image: (its example, None if it is bad; its problems; warnings)."""
    warnings: list[str] = []
    try:
        path = image.l1_path if plan.cube_source == "L1" else image.cube_path
        cube = tivita.read_l1(image) if plan.cube_source == "L1" else tivita.read_cube(path)
        if cube.shape != (*plan.size, NUM_BANDS):
            raise ValueError(f"{path}: shape {cube.shape}, expected {(*plan.size, NUM_BANDS)}")
        errors, warnings = tivita.cube_problems(cube)
        if errors:
            return None, [f"cube: {', '.join(errors)}"], warnings
        return _example(plan, image, meta, settings, cube), [], warnings
    except (OSError, ValueError) as e:
        return None, [_short(e)], warnings


def _example(plan: Plan, image: tivita.TivitaImage, meta: Meta, settings, cube: np.ndarray
             ) -> dict:
    """One image's example from its checked cube (raises ValueError for bad parameter images)."""
    masks = tivita.read_annotations(image.annotation_path)
    primary = primary_annotation(image, plan.annotation_names, settings)
    stacked = []
    for annotation in (primary, *plan.annotation_names[1:]):
        if annotation in masks:
            labels, _ = tivita.mask_to_labels(masks[annotation], plan.table,
                                              SPECIES_12.invalid_index)
        else:
            labels = np.full(plan.size, SPECIES_12.invalid_index, np.int32)
        stacked.append(labels.astype(np.uint8))
    parameters = NO_PARAMETER_IMAGES
    if plan.parameter_names:
        images = tivita.read_parameter_images(image)
        missing = [p for p in plan.parameter_names if p not in images]
        if missing or any(images[p].shape != plan.size for p in plan.parameter_names):
            raise ValueError(f"{image.parameter_path}: expected {list(plan.parameter_names)} of "
                             f"size {plan.size}, got "
                             f"{ {k: v.shape for k, v in images.items()} }")
        parameters = np.stack([images[p] for p in plan.parameter_names], -1).astype(np.float16)
    return {
        "image_name": image.image_name,
        "subject": image.subject,
        "perfusion_state": meta.perfusion_state,
        "experiment": meta.experiment,
        "cube": cube.astype(np.float16),
        "labels": stacked[0],
        "valid": np.asarray(SPECIES_12.is_valid(stacked[0])),
        "annotation_labels": np.stack(stacked),
        "parameter_images": parameters,
        **meta.features(),
    }


# -- Apache Beam ---------------------------------------------------------------------------------

CHECKS_FILE = "tivita_checks.json"
"""A Beam build's checks of every image, left for the driver in the unfinished dataset folder."""


def beam_splits(plan: Plan, settings: Mapping[str, Any], species: str, checks_path: epath.Path
                ) -> dict[str, Any]:
    """The Beam form of `generate_split`: one ``beam.PTransform`` per split, one element per
    image.

    The same report policy as the local build, with the problems gathered before anything is
    written: every image is read and checked first (all splits together), and the checked plan
    (every problem) is a side input of the steps that make the examples, so these start only
    once every image is checked. With problems they fail with the one report (unless
    ``skip_invalid``), else they read the good images again and make their examples (one more
    read of each cube, instead of holding every example between the steps). The checks are
    also written to `checks_path`, for the driver's metadata (`finish_beam_build`).
    """
    beam = data_builders.import_beam()
    todo = [(image, meta) for image, meta in plan.images if image.image_name not in plan.problems]
    splits = plan.splits
    plan = dataclasses.replace(plan, images=[])  # the workers' copy: the images are elements
    stages = {}

    def shared(pipeline):  # the images and their checks, added by the first split's transform
        if pipeline not in stages:
            images = pipeline | "Images" >> beam.Create(todo)
            checked = (images
                       | "Check" >> beam.Map(_check, plan=plan, settings=settings)
                       | "Gather" >> beam.combiners.ToList()
                       | "CheckedPlan" >> beam.Map(_checked_plan, plan=plan))
            _ = checked | "WriteChecks" >> beam.Map(_write_checks, path=checks_path)
            stages[pipeline] = images, beam.pvalue.AsSingleton(checked)
        return stages[pipeline]

    @beam.ptransform_fn
    def write_split(pbegin, split):
        images, checked = shared(pbegin.pipeline)
        return (images
                | "Select" >> beam.Filter(_in_split, split=split)
                | "Examples" >> beam.FlatMap(_checked_examples, settings=settings,
                                             species=species, checked=checked))

    return {split: write_split(split) for split in splits}


def finish_beam_build(plan: Plan, checks_path: epath.Path) -> None:
    """In the driver after the pipeline: the workers' checks -> `plan` (its metadata), the
    skipped images reported (or the report raised, if the pipeline did not)."""
    checks = json.loads(checks_path.read_text())
    checks_path.unlink()
    plan.problems, plan.warnings = checks["problems"], checks["warnings"]
    plan.fail_or_warn()


def _in_split(item: tuple[tivita.TivitaImage, Meta], split: str) -> bool:
    return item[1].perfusion_state == split


def _check(item: tuple[tivita.TivitaImage, Meta], plan: Plan, settings
           ) -> tuple[str, list[str], list[str]]:
    image, meta = item
    _, problems, warnings = read_image(plan, image, meta, settings)
    return image.image_name, problems, warnings


def _checked_plan(checks: list[tuple[str, list[str], list[str]]], plan: Plan) -> Plan:
    checked = dataclasses.replace(plan, problems={k: list(v) for k, v in plan.problems.items()},
                                  warnings=dict(plan.warnings))
    for name, problems, warnings in checks:
        checked.record(name, problems, warnings)
    return checked


def _write_checks(checked: Plan, path: epath.Path) -> None:
    path.write_text(json.dumps({"problems": checked.problems, "warnings": checked.warnings}))


def _checked_examples(item: tuple[tivita.TivitaImage, Meta], settings, species: str,
                      checked: Plan) -> Iterator[tuple[str, dict]]:
    if checked.problems and not checked.skip_invalid:
        raise InvalidDataError(checked.report())
    image, meta = item
    if image.image_name in checked.problems:
        return
    example, problems, _ = read_image(checked, image, meta, settings)
    if example is None:
        raise InvalidDataError(f"{image.image_name}: {'; '.join(problems)} (it passed the "
                               "checks earlier in this build: did the file change?)")
    yield image.image_name, {**example, "species": species}


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
