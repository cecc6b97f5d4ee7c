"""The shared base of the species datasets: simulated configs and real Tivita data.

Every species is a TFDS dataset folder (``data_builders/<species>/``) whose ``Builder``
subclasses `SpeciesBuilder` and lists its experiments as `SimulatedSet`s. Three configs:

- ``sim_small`` (default): simulated 64 x 80 images, a few hundred per species;
- ``sim_full``: simulated 480 x 640 images with the paper's structure and counts;
- ``sim_tiny``: simulated 32 x 40 images, one per subject (tests and smoke runs);
- ``tivita``: real Tivita data from ``manual_dir`` in the reference (htc) layout.

Diverged configs, for sweeps of how far the species' pathological responses lie apart, are
named ``<base>-divergence<d>-from-<source>``, e.g. ``sim_small-divergence0.5-from-pig``
(`diverged_config_name`): a simulated base config whose pathological images (every state but
``physiological``) are simulated with ``simulate.with_response_divergence(species, source, d)``
(0: the source species' perfusion responses on this species' physiology, 1: its own, above 1
further apart). Image names, subjects and the physiological split are the base config's, byte
for byte, and divergence 1 gives the base config's pathological images too. ``d`` is written
as a plain decimal without superfluous digits (``0``, ``0.5``, ``1``, ``2.25``), so one
divergence has one name and one dataset folder. Such configs are not listed in
``BUILDER_CONFIGS``; the builders resolve any such name (`SpeciesBuilder.get_builder_config`),
so ``tfds.builder("human/sim_small-divergence0.5-from-pig")`` works once the species' builder
is imported (`data_builders.builder` imports it), and a built one reads from its files alone.

Examples are written as ArrayRecord files and read with ``tfds.data_source``; neither needs
TensorFlow. Splits are perfusion states (``physiological``, ``malperfusion``, ``icg``, ...); the
``experiment`` feature tells which experiment an image comes from (``semantic`` for the
physiological multi-organ set that trains segmentation networks, ``kidney`` or
``aortic_clamping`` for malperfusion experiments, ``icg``, ...), so a data spec can select, e.g.,
the kidney experiment's physiological and malperfused images for projection learning.

TFDS writes into an ``incomplete.*`` folder and renames it only when every split is written, so
an interrupted build never leaves a dataset that looks complete. A build holds a file lock on
its dataset folder; under it, ``incomplete.*`` folders left by killed builds are removed.

A build runs in this process, or on Apache Beam (the ``beam`` extra) when TFDS's download config
names a Beam runner or options (``--beam_pipeline_options``): simulated data one element per
generation batch, real data one per image (`tivita_data.beam_splits`); the examples are the same.

The real-data build (checks, bad-data report, formats) is `data_builders.tivita_data`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

import data_builders
from data_builders import tivita_data
from xeno_jax import simulate
from xeno_jax.io import tivita
from xeno_jax.labels import SPECIES_12

NUM_BANDS = 100
# Severity of clamping experiments (renal artery, renal vein, aorta): complete occlusion. The
# reference's malperfused kidneys show a Tivita StO2 index mostly within 0.1-0.3 (the paper's
# malperfusion histograms; arterial occlusion about 20 % in porcine kidney, Nadeau et al. 2013;
# venous congestion 13.4 +- 3.1 %, Studier-Fischer et al. 2024); severities from 0.2 gave
# index medians of 0.33-0.45, from 0.8 still 0.28-0.36; the simulated index reads about 0.25
# at a true saturation near 0.1.
CLAMPED = (0.95, 1.0)
GENERATION_BATCH = 8  # images simulated per call (a fixed shape: one compilation)
DATASET_SEED = 1_897

@dataclasses.dataclass(frozen=True)
class SimulatedSet:
    """One simulated experiment of a species.

    Attributes:
      experiment: the ``experiment`` feature (``semantic``, ``kidney``, ...).
      split: the split (perfusion state) its images go to.
      state: simulator perfusion state.
      images_per_subject: images of each subject (a tuple of per-subject counts, cycled).
      subjects: number of subjects (numbered from `first_subject`, disjoint across sets).
      first_subject: number of the first subject.
      focus: organs the images centre on, cycled (``None`` entries: no focus organ).
      affected: organs a malperfusion acts on.
      severity: uniform range of the severity.
      minutes: uniform range of the time since the ICG bolus.
      icg_dose_mg_kg: uniform range of the ICG dose.
      annotation: ``semantic`` (all classes) or ``polygon`` (only the focus organ annotated,
        everything else invalid, as htc's ``polygon#malperfused``).
    """

    experiment: str
    split: str
    state: str
    subjects: int
    images_per_subject: tuple[int, ...]
    first_subject: int
    focus: tuple[str | None, ...] = (None,)
    affected: tuple[str, ...] = ("kidney",)
    severity: tuple[float, float] = (0.0, 0.0)
    minutes: tuple[float, float] = (0.0, 0.0)
    icg_dose_mg_kg: tuple[float, float] = (0.25, 0.25)
    annotation: str = "semantic"

    def __post_init__(self):
        simulate.state_index(self.state)
        if self.annotation not in ("semantic", "polygon"):
            raise ValueError(f"annotation must be 'semantic' or 'polygon', got {self.annotation}")
        if self.annotation == "polygon" and None in self.focus:
            raise ValueError("polygon annotations need a focus organ for every image")

    @property
    def num_images(self) -> int:
        counts = self.images_per_subject
        return sum(counts[i % len(counts)] for i in range(self.subjects))


@dataclasses.dataclass
class SpeciesConfig(tfds.core.BuilderConfig):
    """A species dataset config.

    Attributes:
      source: ``simulated`` or ``tivita``.
      height, width: image size of simulated data (real data: the cubes' size, any one size).
      paper_counts: simulate the paper's numbers of subjects and images (``sim_full``).
      max_images_per_subject: cap on each subject's images in a set (keeps every subject).
      max_images_per_set: cap on the images of each simulated set (tests, previews).
      response_source: simulated configs: the species whose perfusion responses the
        pathological images' responses are placed relative to (None: the species' own
        responses; diverged configs, `diverged_config_name`).
      response_divergence: with `response_source`: the ``response_divergence`` of
        `simulate.with_response_divergence` (0: the source's responses, 1: the species' own).
    """

    source: str = "simulated"
    height: int = 96
    width: int = 128
    paper_counts: bool = False
    max_images_per_subject: int | None = None
    max_images_per_set: int | None = None
    response_source: str | None = None
    response_divergence: float = 1.0


SIM_SMALL = SpeciesConfig(name="sim_small", height=64, width=80,
                          description="Simulated, 64 x 80, a few hundred images per species (the "
                          "default; trains in minutes on a laptop CPU).")
SIM_FULL = SpeciesConfig(name="sim_full", height=480, width=640, paper_counts=True,
                         description="Simulated, 480 x 640, the paper's structure and counts.")
SIM_TINY = SpeciesConfig(name="sim_tiny", height=32, width=40, max_images_per_subject=1,
                         description="Simulated, 32 x 40, one image per subject: for tests and "
                         "smoke runs of the whole study.")
TIVITA = SpeciesConfig(name="tivita", source="tivita", description="Real Tivita data from "
                       "manual_dir, in the reference (htc) dataset layout; the image size is "
                       "the cubes' (480 x 640 for the camera).")

DIVERGENCE_MARK = "-divergence"
_DIVERGED_NAME = re.compile(r"^(?P<base>.*?)-divergence(?P<value>.*)-from-(?P<source>.*)$")
_PLAIN_DECIMAL = re.compile(r"^\d+(\.\d+)?$")


def divergence_text(response_divergence: float) -> str:
    """The spelling of a divergence in config names: a plain decimal without superfluous
    digits (``0``, ``0.5``, ``1``, ``2.25``; the shortest that reads back as the same float)."""
    value = float(response_divergence)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"response divergence {response_divergence!r}: expected a finite "
                         f"number >= 0 (0: the source's responses, 1: the species' own)")
    return np.format_float_positional(value, trim="-")


def diverged_config_name(base: str, response_divergence: float, source: str) -> str:
    """``<base>-divergence<d>-from-<source>``, e.g. ``sim_small-divergence0.5-from-pig``."""
    return f"{base}{DIVERGENCE_MARK}{divergence_text(response_divergence)}-from-{source}"


def parse_diverged_config(name: str, species: str,
                          configs: list[SpeciesConfig]) -> SpeciesConfig | None:
    """The config a diverged name stands for (`diverged_config_name`) for a builder of
    `species` with the base configs `configs`; None for a name without ``-divergence``.

    Raises:
      ValueError: naming the bad part and what is expected (unknown or real-data base
        config, a divergence that is negative or not a plain decimal, an unknown source
        species or the dataset's own).
    """
    if DIVERGENCE_MARK not in name:
        return None
    what = f"dataset config {name!r} of {species!r}"
    simulated = {c.name: c for c in configs if c.source == "simulated"}
    match = _DIVERGED_NAME.match(name)
    if not match:
        raise ValueError(f"{what}: expected '<base>-divergence<d>-from-<source>', e.g. "
                         f"'{diverged_config_name('sim_small', 0.5, 'pig')}'")
    base, value, source = match["base"], match["value"], match["source"]
    if base not in simulated:
        known = {c.name for c in configs}
        why = "is real data" if base in known else "is unknown"
        raise ValueError(f"{what}: base config {base!r} {why}; expected a simulated config: "
                         f"{sorted(simulated)}")
    try:
        divergence = float(value)
    except ValueError:
        divergence = math.nan
    if divergence < 0:
        raise ValueError(f"{what}: response divergence {value} is negative; expected a number "
                         f">= 0 (0: the source's responses, 1: the species' own)")
    if not _PLAIN_DECIMAL.match(value) or divergence_text(divergence) != value:
        hint = (f" (write it {divergence_text(divergence)!r})" if _PLAIN_DECIMAL.match(value)
                else "")
        raise ValueError(f"{what}: response divergence {value!r}: expected a number >= 0 "
                         f"written as a plain decimal without superfluous digits, e.g. '0', "
                         f"'0.5', '1', '2.25'{hint}")
    names = simulate.species_names()
    if source not in names:
        raise ValueError(f"{what}: unknown source species {source!r}; expected one of "
                         f"{[n for n in names if n != species]}")
    if source == species:
        raise ValueError(f"{what}: the source species is the dataset's own species "
                         f"{species!r}; expected another: {[n for n in names if n != species]}")
    return dataclasses.replace(
        simulated[base], name=name, response_source=source, response_divergence=divergence,
        description=f"{simulated[base].description} Pathological responses at response "
                    f"divergence {value} from the {source}'s (0: the {source}'s responses, 1: "
                    f"the {species}'s own); the physiological images are {base}'s.")


MANUAL_DOWNLOAD_INSTRUCTIONS = """\
For the `tivita` config, point `manual_dir` at a dataset in the reference (htc) layout:

  <manual_dir>/data/dataset_settings.json          (label_mapping, last_valid_label_index, ...)
  <manual_dir>/data/subjects/<subject>/<timestamp>/<timestamp>_SpecCube.dat
  <manual_dir>/data/subjects/<subject>/<timestamp>/annotations/<timestamp>_meta.json (optional)
  <manual_dir>/data/overlap/<subject>/<timestamp>/...   (optional, images named ...#overlap)
  <manual_dir>/intermediates/segmentations/<image_name>.blosc
  <manual_dir>/intermediates/preprocessing/L1/<image_name>.blosc                (optional)
  <manual_dir>/intermediates/preprocessing/parameter_images/<image_name>.blosc  (optional)

Labels are mapped by name through dataset_settings.json to the 12-class species mapping; unknown
names fail the build (map or ignore them). The optional meta file gives the perfusion state
(`perfusion_state`, or htc's `phase_type`: ischemia/avascular/stasis are malperfusion), the
`experiment` and the reference's perfusion and ICG keys (see the README). Bad images (NaN, inf,
all-zero pixels, annotations of another size, unknown label ids, missing files) are listed in
one report and fail the build unless `skip_invalid` is set.
"""


class SpeciesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the species builders; subclasses set `SPECIES`, `SUBJECT_FORMAT` and the sets."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Simulated configs: `labels_full`, every pixel's class (the full ground truth "
                 "next to the polygon `labels` of pathological images); focus organs drawn "
                 "like any other (no enlargement, centring or top drawing); simulator "
                 "checked against the paper (kidney StO2, subject variance, complete "
                 "clamping: severity 0.95-1 in the clamping experiments).",
        "1.2.0": "Simulated configs: the metadata's `pathological_organs` names the organs each "
                 "pathological experiment acts on (the analyses leave out the others, such as "
                 "the unclamped kidneys of aortic-clamping images); simulator checked "
                 "against the paper's variance decomposition (subject effects 0.65 of the "
                 "organ prior spread, was 0.5) and the rat's kidney StO2 index (saturation "
                 "shift +0.10, was +0.08).",
    }
    BUILDER_CONFIGS = [SIM_SMALL, SIM_FULL, SIM_TINY, TIVITA]
    DEFAULT_CONFIG_NAME = "sim_small"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    SPECIES: str = ""
    DEFAULT_REAL_DATA = tivita_data.RealDataOptions()
    """Real-data options of builders made without `real_data` (set by the build command)."""
    SUBJECT_FORMAT: str = "S{:03d}"
    FIRST_RECORDING = datetime.datetime(2021, 1, 1, 9, 0, 0)

    def small_sets(self) -> list[SimulatedSet]:
        """The experiments of ``sim_small``."""
        raise NotImplementedError

    def paper_sets(self) -> list[SimulatedSet]:
        """The experiments of ``sim_full`` (the paper's structure and counts)."""
        raise NotImplementedError

    def __init__(self, *, real_data: tivita_data.RealDataOptions | None = None, **kwargs):
        """Args: real_data: options of the ``tivita`` build; kwargs: TFDS's."""
        self.real_data = real_data or self.DEFAULT_REAL_DATA
        self._beam = False  # set by download_and_prepare
        self._pathological_species = None  # made on first use (`simulated_species`)
        super().__init__(**kwargs)

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> SpeciesConfig | None:
        """TFDS's look-up of a config by name, which also resolves diverged configs
        (``sim_small-divergence0.5-from-pig``, `parse_diverged_config`; a bad one raises a
        ValueError saying what is wrong)."""
        config = super().get_builder_config(name, version)
        if config is None and cls.SPECIES:
            config = parse_diverged_config(name, cls.SPECIES, cls.BUILDER_CONFIGS)
        return config

    def __reduce__(self):
        """Pickled by species name and TFDS's constructor arguments, so that a Beam worker
        finds the class in the installed package, also when the TFDS command loaded it from
        its folder (as ``pig.pig_dataset_builder``)."""
        return _restore_builder, (self.SPECIES, self._original_state)

    # -- TFDS interface ---------------------------------------------------------------------

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        real = config.source == "tivita"
        # Real data: any one size per dataset (checked when building, kept in the metadata).
        height, width = (None, None) if real else (config.height, config.width)
        # Raw bytes: TFDS would otherwise write arrays value by value as protobuf lists.
        array = lambda shape, dtype: tfds.features.Tensor(
            shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)
        features = {
            "image_name": tfds.features.Text(),
            "subject": tfds.features.Text(),
            "species": tfds.features.Text(),
            "perfusion_state": tfds.features.Text(),
            "experiment": tfds.features.Text(),
            "cube": array((height, width, NUM_BANDS), np.float16),
            "labels": array((height, width), np.uint8),
            "valid": array((height, width), np.bool_),
        }
        if config.source == "simulated":
            features |= {
                "labels_full": array((height, width), np.uint8),
                "saturation": array((height, width), np.float16),
                "blood_volume": array((height, width), np.float16),
                "severity": tfds.features.Scalar(dtype=np.float32),
                "minutes": tfds.features.Scalar(dtype=np.float32),
                "icg_dose_mg_kg": tfds.features.Scalar(dtype=np.float32),
                "icg_plasma_molar": tfds.features.Scalar(dtype=np.float32),
            }
        if real:
            features |= {
                "annotation_labels": array((None, height, width), np.uint8),
                "parameter_images": array((None, None, None), np.float16),
                "phase_type": tfds.features.Text(),
                "clamping_location": tfds.features.Text(),
                "reperfused": tfds.features.Scalar(dtype=np.int8),
                "phase_time": tfds.features.Scalar(dtype=np.float32),
                "icg_dose": tfds.features.Scalar(dtype=np.float32),
                "icg_time": tfds.features.Scalar(dtype=np.float32),
            }
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Spectral images (Tivita-like, 100 bands, 500-1000 nm) of {self.SPECIES} "
                        f"abdominal organs, 12-class labels (invalid index 12). "
                        f"{config.description}",
            features=tfds.features.FeaturesDict(features),
            homepage="https://doi.org/10.1038/s41551-025-01585-4",
            citation=self._citation(),
            # Simulated data: the organs each pathology acts on (`Catalog.pathological_organs`).
            metadata=tfds.core.MetadataDict(
                {} if real else {"pathological_organs": self.pathological_organs()}),
        )

    def _citation(self) -> str:
        module = Path(__import__(type(self).__module__, fromlist=["_"]).__file__)
        path = module.parent / "CITATIONS.bib"
        return path.read_text() if path.exists() else ""

    def download_and_prepare(self, *args, **kwargs):
        """TFDS's build, under a lock on the dataset folder; removes what killed builds left.

        The build runs on Apache Beam when ``download_config`` names a Beam runner or options
        (``beam_runner``, ``beam_options``), else in this process.
        """
        config = kwargs.get("download_config")
        self._beam = bool(config and (config.beam_runner or config.beam_options))
        folder = Path(self.data_dir).parent
        folder.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(folder / f".{self.version}.build.lock"):
            # Under the lock no other build is running: these are from killed builds.
            for stale in folder.glob(f"{tfds.core.constants.INCOMPLETE_PREFIX}*_{self.version}"):
                logging.warning("removing %s, left by an interrupted build", stale)
                shutil.rmtree(stale)
            return super().download_and_prepare(*args, **kwargs)

    def _split_generators(self, dl_manager):
        if self.builder_config.source == "tivita":
            return self._tivita_splits(Path(dl_manager.manual_dir))
        splits = sorted({item[1].split for item in self.planned_images()})
        generate = self._beam_simulated if self._beam else self._generate_simulated
        return {split: generate(split) for split in splits}

    def _generate_examples(self, *args):  # TFDS requires it; the split generators are specific.
        raise NotImplementedError("splits come from _generate_simulated or _generate_tivita")

    # -- simulated data -----------------------------------------------------------------------

    def planned_images(self) -> list[tuple[int, SimulatedSet, int, int]]:
        """(set number, set, subject number, image index) of every image to simulate.

        The set number is the set's position in the config's list, so that two sets of the same
        subjects (the physiological and malperfused images of one experiment) never collide.
        """
        sets = self.paper_sets() if self.builder_config.paper_counts else self.small_sets()
        cap = self.builder_config.max_images_per_set
        per_subject = self.builder_config.max_images_per_subject
        plan = []
        for set_number, simulated in enumerate(sets):
            images = []
            for s in range(simulated.subjects):
                count = simulated.images_per_subject[s % len(simulated.images_per_subject)]
                images += [simulated.first_subject + s] * min(count, per_subject or count)
            plan += [(set_number, simulated, subject, i) for i, subject in enumerate(images[:cap])]
        return plan

    def pathological_organs(self) -> dict[str, dict[str, list[str]]]:
        """``{split: {experiment: organ names}}``: the organs each pathological experiment of a
        simulated config acts on (a malperfusion its `affected` organs, ICG every organ)."""
        every_organ = [SPECIES_12.index_to_name(i) for i in range(1, SPECIES_12.invalid_index)]
        found: dict[str, dict[str, list[str]]] = {}
        for _, simulated, _, _ in self.planned_images():
            if simulated.state == "physiological":
                continue
            organs = every_organ if simulated.state == "icg" else sorted(simulated.affected)
            known = found.setdefault(simulated.split, {}).setdefault(simulated.experiment, organs)
            if known != organs:
                raise ValueError(f"{self.name}/{self.builder_config.name}: the sets of split "
                                 f"{simulated.split!r}, experiment {simulated.experiment!r} act "
                                 f"on different organs")
        return found

    def simulated_species(self, state: str) -> simulate.Species:
        """The `Species` that simulates images of a perfusion state: the species' own, or for
        the pathological states of a diverged config (`SpeciesConfig.response_source`) its
        responses placed relative to the source's (`simulate.with_response_divergence`)."""
        own = simulate.get_species(self.SPECIES)
        config = self.builder_config
        # Divergence 1 is the species' own responses exactly (the interpolation is not).
        if state == "physiological" or config.response_source is None or (
                config.response_divergence == 1):
            return own
        if self._pathological_species is None:
            self._pathological_species = simulate.with_response_divergence(
                own, simulate.get_species(config.response_source), config.response_divergence)
        return self._pathological_species

    def image_spec(self, set_number: int, simulated: SimulatedSet, subject: int, index: int):
        """The simulator key and `Spec` of one image (a pure function of its identity; the
        identity, and so the key, of a diverged config's image is its base config's)."""
        species = simulate.get_species(self.SPECIES)
        rng = np.random.default_rng(
            [DATASET_SEED, int(species.species_id), set_number, subject, index])
        focus = simulated.focus[index % len(simulated.focus)]
        spec = simulate.make_spec(
            self.simulated_species(simulated.state), subject=subject, state=simulated.state,
            severity=float(rng.uniform(*simulated.severity)),
            minutes=float(rng.uniform(*simulated.minutes)),
            icg_dose_mg_kg=float(rng.uniform(*simulated.icg_dose_mg_kg)), focus=focus,
            affected=simulated.affected)
        return jax.random.key(int(rng.integers(2**31))), spec

    def image_name(self, set_number: int, simulated: SimulatedSet, subject: int,
                   index: int) -> str:
        """``<subject>#<timestamp>``: one recording day per subject, one hour per set."""
        timestamp = self.FIRST_RECORDING + datetime.timedelta(
            days=subject, hours=set_number, seconds=17 * index)
        return f"{self.SUBJECT_FORMAT.format(subject)}#{timestamp:%Y_%m_%d_%H_%M_%S}"

    def _simulated_batches(self, split: str) -> list[list[tuple[int, SimulatedSet, int, int]]]:
        """The planned images of a split in batches of `GENERATION_BATCH` (the last one short)."""
        plan = [item for item in self.planned_images() if item[1].split == split]
        return [plan[start:start + GENERATION_BATCH]
                for start in range(0, len(plan), GENERATION_BATCH)]

    def _generate_batch(self, batch) -> Iterator[tuple[str, dict]]:
        """The examples of one batch, simulated in one call of fixed shape (padded)."""
        config = self.builder_config
        padded = batch + [batch[-1]] * (GENERATION_BATCH - len(batch))
        keys, specs = zip(*(self.image_spec(*item) for item in padded), strict=True)
        out = simulate.generate_batch(jnp.stack(keys), simulate.stack_specs(specs),
                                      height=config.height, width=config.width)
        out = jax.tree.map(np.asarray, out)
        for row, item in enumerate(batch):
            name = self.image_name(*item)
            yield name, self._simulated_example(name, *item[1:],
                                                jax.tree.map(lambda x, r=row: x[r], out))

    def _generate_simulated(self, split: str) -> Iterator[tuple[str, dict]]:
        for batch in self._simulated_batches(split):
            yield from self._generate_batch(batch)

    def _beam_simulated(self, split: str):
        """The Beam form of `_generate_simulated`: one element per batch (one compilation per
        worker); the builder travels to the workers as TFDS pickles it (its constructor
        arguments)."""
        beam = data_builders.import_beam()
        return ("Batches" >> beam.Create(self._simulated_batches(split))
                | "Simulate" >> beam.FlatMap(self._generate_batch))

    def _simulated_example(self, name, simulated, subject, index, out) -> dict:
        labels = out["labels"]
        if simulated.annotation == "polygon":
            focus = SPECIES_12.name_to_index(simulated.focus[index % len(simulated.focus)])
            labels = np.where(labels == focus, focus, SPECIES_12.invalid_index)
        meta = out["metadata"]
        return {
            "image_name": name,
            "subject": self.SUBJECT_FORMAT.format(subject),
            "species": self.SPECIES,
            "perfusion_state": simulated.split,
            "experiment": simulated.experiment,
            "cube": out["cube"].astype(np.float16),
            "labels": labels.astype(np.uint8),
            "valid": np.asarray(SPECIES_12.is_valid(labels)),
            "labels_full": out["labels"].astype(np.uint8),
            "saturation": out["saturation"].astype(np.float16),
            "blood_volume": out["blood_volume"].astype(np.float16),
            "severity": np.float32(meta["severity"]),
            "minutes": np.float32(meta["minutes"]),
            "icg_dose_mg_kg": np.float32(meta["icg_dose_mg_kg"]),
            "icg_plasma_molar": np.float32(meta["icg_plasma_molar"]),
        }

    # -- real Tivita data ---------------------------------------------------------------------

    def _tivita_splits(self, root: Path):
        plan = tivita_data.plan_build(root, self.real_data)
        settings = tivita.read_dataset_settings(root)
        plan.splits_left = set(plan.splits)
        self.info.metadata.update(plan.metadata())
        if self._beam:
            self._tivita_plan = plan
            return tivita_data.beam_splits(plan, settings, self.SPECIES, self._checks_path())
        return {split: self._generate_tivita(plan, split, settings) for split in plan.splits}

    def _generate_tivita(self, plan, split, settings) -> Iterator[tuple[str, dict]]:
        for key, example in tivita_data.generate_split(plan, split, settings):
            yield key, {**example, "species": self.SPECIES}
        self.info.metadata.update(plan.metadata())  # images skipped while writing

    def _checks_path(self):
        """Where a Beam build's workers leave the cube checks for the driver (in the
        unfinished dataset folder, which they write anyway; removed once read)."""
        return epath.Path(self.data_dir) / tivita_data.CHECKS_FILE

    def _process_pipeline_result(self, pipeline_result) -> None:
        """After a Beam build: the images its workers skipped and warned about -> metadata."""
        if self.builder_config.source == "tivita":
            tivita_data.finish_beam_build(self._tivita_plan, self._checks_path())
            self.info.metadata.update(self._tivita_plan.metadata())


def _restore_builder(species: str, state: dict) -> SpeciesBuilder:
    return data_builders.builder_class(species)(**state)
