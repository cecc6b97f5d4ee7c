"""A catalog of the images of one or more TFDS species datasets, by image name.

Data specs (folds) list image names; training and evaluation read records. `Catalog` maps
between them: for every record of the given datasets and splits it holds the image name,
subject, species, perfusion state, experiment and which valid labels the image contains. The
per-record metadata needs one pass over the labels of every record; it is cached next to the
dataset (``xeno_index.<split>.json`` in the dataset's version folder), so the pass runs once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from xeno_jax.io import atomic_write
from xeno_jax.labels import SPECIES_12

INDEX_VERSION = 1
_META_FIELDS = ("image_name", "subject", "species", "perfusion_state", "experiment")


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """A TFDS dataset split: ``name`` like ``"pig/sim_small"`` and the split."""

    name: str
    split: str

    @classmethod
    def parse(cls, text: str) -> DatasetRef:
        """From ``"<name>/<config>:<split>"``, e.g. ``"pig/sim_small:physiological"``."""
        name, sep, split = text.rpartition(":")
        if not sep or not name or not split:
            raise ValueError(f"dataset reference {text!r}: expected '<name>/<config>:<split>'")
        return cls(name, split)

    def __str__(self) -> str:
        return f"{self.name}:{self.split}"


@dataclasses.dataclass(frozen=True)
class Record:
    """Where an image is and what it contains."""

    image_name: str
    subject: str
    species: str
    perfusion_state: str
    experiment: str
    source: int  # index into Catalog.sources
    index: int  # record index in that source
    labels: tuple[int, ...]  # valid label indices present in the image


class Catalog:
    """Images of several dataset splits, looked up by name.

    Args:
      datasets: dataset splits (`DatasetRef` or ``"<name>/<config>:<split>"`` strings).
      data_dir: the TFDS data directory.
    """

    def __init__(self, datasets: Iterable[DatasetRef | str], data_dir: str | os.PathLike):
        self.refs = [d if isinstance(d, DatasetRef) else DatasetRef.parse(d) for d in datasets]
        self.data_dir = Path(data_dir)
        self.sources = []
        self.parameter_names: list[list[str]] = []  # per source: the vendor's parameter images
        # Per source: {experiment: organs its pathology acts on}, where the dataset says.
        self._pathological_organs: list[dict | None] = []
        self.records: list[Record] = []
        for number, ref in enumerate(self.refs):
            builder = tfds.builder(ref.name, data_dir=str(self.data_dir))
            if ref.split not in builder.info.splits:
                raise ValueError(f"{ref}: no split {ref.split!r}; the dataset has "
                                 f"{sorted(builder.info.splits)}")
            source = builder.as_data_source(split=ref.split)
            self.sources.append(source)
            metadata = builder.info.metadata or {}
            self.parameter_names.append(list(metadata.get("parameter_names", [])))
            organs = metadata.get("pathological_organs")
            self._pathological_organs.append(None if organs is None else {
                experiment: tuple(sorted(SPECIES_12.name_to_index(n) for n in names))
                for experiment, names in organs.get(ref.split, {}).items()})
            cache = Path(builder.data_dir) / f"xeno_index.{ref.split}.json"
            self.records += [Record(**{**row, "labels": tuple(row["labels"])}, source=number)
                             for row in _index(source, cache)]
        self._by_name = {}
        for record in self.records:
            if record.image_name in self._by_name:
                raise ValueError(f"image {record.image_name} appears in more than one dataset")
            self._by_name[record.image_name] = record

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, image_name: str) -> Record:
        try:
            return self._by_name[image_name]
        except KeyError:
            raise KeyError(f"image {image_name!r} is in none of {[str(r) for r in self.refs]}"
                           ) from None

    def select(self, image_names: Sequence[str]) -> list[Record]:
        """Records of the given names, in order; all unknown names are reported at once.

        A reference name's annotation suffix (``P041#2019_12_14_12_00_00@semantic#primary``)
        is dropped: the dataset was built with the annotation it names.
        """
        names = [n if n in self._by_name else n.partition("@")[0] for n in image_names]
        missing = [n for n in names if n not in self._by_name]
        if missing:
            raise KeyError(f"{len(missing)} images are in none of "
                           f"{[str(r) for r in self.refs]}: {missing[:10]}")
        return [self._by_name[n] for n in names]

    def filter(self, **criteria) -> list[Record]:
        """Records whose fields equal the given values (a sequence value means any of them)."""
        def matches(record):
            for field, wanted in criteria.items():
                value = getattr(record, field)
                if isinstance(wanted, str | int) and value != wanted:
                    return False
                if not isinstance(wanted, str | int) and value not in wanted:
                    return False
            return True
        return [r for r in self.records if matches(r)]

    def read(self, record: Record) -> dict:
        """The decoded example of a record (NumPy arrays)."""
        return self.sources[record.source][record.index]

    def pathological_organs(self, record: Record) -> tuple[int, ...] | None:
        """The organs the pathology of a pathological record acts on; ``None`` where every
        annotated organ counts (physiological records, datasets that do not say)."""
        known = self._pathological_organs[record.source]
        return None if known is None else known.get(record.experiment)

    def vendor_index(self, record: Record, example: dict, name: str = "StO2"
                     ) -> np.ndarray | None:
        """The vendor's parameter image `name` of a real image (float32 (H, W)), if its dataset
        has the vendor's parameter images (``intermediates/preprocessing/parameter_images``)."""
        names = self.parameter_names[record.source]
        if name not in names:
            return None
        return np.asarray(example["parameter_images"][..., names.index(name)], np.float32)


def _index(source, cache: Path) -> list[dict]:
    """Per-record metadata of a data source, from the cache file or one pass over the records."""
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("version") == INDEX_VERSION and data.get("length") == len(source):
            return data["records"]
    rows = []
    for index in range(len(source)):
        example = source[index]
        labels = np.asarray(example["labels"])
        valid = np.unique(labels[np.asarray(example["valid"])])
        row = {f: _text(example[f]) for f in _META_FIELDS}
        rows.append({**row, "index": index,
                     "labels": [int(v) for v in valid if SPECIES_12.is_valid(int(v))]})
    with atomic_write(cache, text=True) as f:
        f.write(json.dumps({"version": INDEX_VERSION, "length": len(source), "records": rows}))
    return rows


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
