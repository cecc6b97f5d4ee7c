"""Label mappings: names <-> training indices, with one invalid index for everything unknown.

A `LabelMapping` maps label names to contiguous training indices ``0 .. last_valid_label_index``.
Several names may share an index (``meso`` is ``small_bowel``); every name it does not know maps
to the invalid index ``last_valid_label_index + 1``, which is excluded from losses and metrics.
`SPECIES_12` is the 12-class mapping of the xeno-learning study (background is a valid class).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabelMapping:
    """Names to training indices; unknown names go to `invalid_index`.

    Attributes:
      mapping: name -> index, indices in ``0 .. last_valid_label_index``.
      last_valid_label_index: the highest valid index.
      index_names: optional canonical name per index; defaults to the first name listed for it.
      zero_is_invalid: treat index 0 as invalid too (the organ-only analysis mapping).
    """

    mapping: Mapping[str, int]
    last_valid_label_index: int
    index_names: Mapping[int, str] | None = None
    zero_is_invalid: bool = False

    def __post_init__(self):
        bad = {n: i for n, i in self.mapping.items() if not 0 <= i <= self.last_valid_label_index}
        if bad:
            raise ValueError(
                f"label indices must lie in 0..{self.last_valid_label_index}, got {bad}"
            )
        if self.index_names is None:
            names: dict[int, str] = {}
            for name, index in self.mapping.items():
                names.setdefault(index, name)
            object.__setattr__(self, "index_names", names)
        missing = set(range(self.last_valid_label_index + 1)) - set(self.index_names)
        if missing:
            raise ValueError(f"no name for label indices {sorted(missing)}")

    @property
    def invalid_index(self) -> int:
        return self.last_valid_label_index + 1

    @property
    def num_classes(self) -> int:
        """Number of valid training classes (the network's outputs)."""
        return self.last_valid_label_index + 1

    @property
    def label_names(self) -> list[str]:
        """Canonical name of every valid index, in index order."""
        return [self.index_names[i] for i in range(self.num_classes)]

    def name_to_index(self, name: str) -> int:
        return self.mapping.get(name, self.invalid_index)

    def index_to_name(self, index: int) -> str:
        index = int(index)
        if index == self.invalid_index:
            return "unknown"
        if index not in self.index_names:
            raise ValueError(f"label index {index} is not in 0..{self.invalid_index}")
        return self.index_names[index]

    def is_valid(self, index: Any) -> Any:
        """Whether an index (scalar, NumPy or JAX array) is a valid training label."""
        low = 1 if self.zero_is_invalid else 0
        return (index >= low) & (index <= self.last_valid_label_index)

    def map_array(self, labels: np.ndarray, source: Mapping[str, int]) -> np.ndarray:
        """Remaps an array of dataset label ids through their names to this mapping.

        Args:
          labels: integer label ids as stored by a dataset.
          source: that dataset's name -> id mapping (``dataset_settings.json``); ids it does not
            name (such as 255, unlabeled) become the invalid index.
        """
        labels = np.asarray(labels)
        table = np.full(max([*source.values(), int(labels.max(initial=0))]) + 1,
                        self.invalid_index, dtype=np.int32)
        for name, index in source.items():
            table[index] = self.name_to_index(name)
        return table[labels]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapping": dict(self.mapping),
            "last_valid_label_index": self.last_valid_label_index,
            "index_names": {str(k): v for k, v in self.index_names.items()},
            "zero_is_invalid": self.zero_is_invalid,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMapping:
        try:
            return cls(
                mapping={str(k): int(v) for k, v in data["mapping"].items()},
                last_valid_label_index=int(data["last_valid_label_index"]),
                index_names={int(k): str(v) for k, v in data.get("index_names", {}).items()}
                or None,
                zero_is_invalid=bool(data.get("zero_is_invalid", False)),
            )
        except KeyError as e:
            raise ValueError(f"label mapping lacks the key {e.args[0]!r}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_names(cls, names: Sequence[str | Sequence[str]]) -> LabelMapping:
        """One index per entry; an entry may be a list of names sharing that index."""
        mapping = {}
        for index, entry in enumerate(names):
            for name in [entry] if isinstance(entry, str) else entry:
                mapping[name] = index
        return cls(mapping, last_valid_label_index=len(names) - 1)


BACKGROUND_NAMES = (
    "background", "metal", "abdominal_linen", "blue_cloth", "blanket", "white_compress",
    "white_compress_dry", "anorganic_artifact", "silicone_gloves_light_blue",
    "silicone_gloves_blue", "silicone_gloves_white", "glove", "foil", "syringe", "stapler",
    "magnets", "sutures",
)

ORGAN_NAMES = (
    "stomach", "small_bowel", "colon", "liver", "pancreas", "kidney", "spleen", "omentum", "lung",
    "skin", "peritoneum",
)

SPECIES_12 = LabelMapping.from_names(
    [BACKGROUND_NAMES, *[("small_bowel", "meso") if n == "small_bowel" else n
                         for n in ORGAN_NAMES]]
)
"""The 12-class mapping of the species study: background 0, eleven organs, invalid index 12."""

# Label subsets of the reference study (names; map with SPECIES_12.name_to_index).
MALPERFUSED_LABELS = ("kidney",)
MALPERFUSED_LABELS_EXTENDED = ("colon", "liver", "kidney", "spleen")
ICG_LABELS = ("stomach", "small_bowel", "colon", "liver", "kidney", "omentum", "peritoneum",
              "pancreas")
PATHOLOGY_LABELS = {"malperfusion": MALPERFUSED_LABELS, "ICG": ICG_LABELS}
"""The target labels of each pathology (spelt as in the configuration names)."""
