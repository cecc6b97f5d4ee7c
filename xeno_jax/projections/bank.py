"""`ProjectionBank`: the learned affine maps of a source species, per training label.

A bank holds, for each label index with matrices, ``n`` pairs of ``W (C, C)`` and ``b (C,)``
(``y = x W + b``, x a row vector), with each pair's final loss and image names. All pairs are
stored in one stack, grouped by label in ascending label order, so that a jitted augmentation can
draw any pair with one gather. The bank is a JAX pytree: ``weights``, ``biases`` and ``losses``
are leaves; label indices, pair counts, names and provenance are static metadata.

File format (HDF5 via h5py, no pickle; written atomically)::

    /                      attrs: format = "xeno_jax.ProjectionBank", version = 1,
                                  source_species (str), state (str), num_channels (int)
    /labels/<index>/       one group per label index (decimal name), attrs: name (str)
        weights            float32 (n, C, C)   W of every pair
        biases             float32 (n, C)      b of every pair
        losses             float32 (n,)        final loss of every pair (NaN if unknown)
        pair_names         UTF-8 str (n, 2)    (physiological, pathological) image names

Non-finite values: every W and b must be finite (a NaN or Inf turns every projected spectrum into
NaN, which the L1 renormalisation then makes all-zero). A bank built from NumPy arrays (by
`from_pairs`, `load`, `from_htc` or the constructor) with NaN or Inf in its weights or biases is
an error naming the label and the number of bad values; losses may be NaN (unknown). Banks of
device arrays (inside jit, after ``device_put``) are not checked again.

The reference implementation's banks (``<name>.blosc``: ``{label_name: float32 [n, C, C+1]}``,
the last column the bias, plus an optional ``<name>.json`` sidecar with per-label lists of
``{name_physiological, name_ischemic, loss}``) are read by `ProjectionBank.from_htc`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import h5py
import jax
import numpy as np

from xeno_jax.io import atomic_write
from xeno_jax.labels import LabelMapping

FORMAT = "xeno_jax.ProjectionBank"
VERSION = 1
_REFERENCE_NAME = re.compile(r"^[^_]+_(?P<state>[^_]+)_(?P<species>[^_]+)_")


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectionBank:
    """Affine maps per label index; a pytree whose leaves are the arrays.

    Attributes:
      weights: ``(N, C, C)`` W of every pair, grouped by label in `label_indices` order.
      biases: ``(N, C)`` b of every pair.
      losses: ``(N,)`` final fitting loss of every pair (NaN where unknown).
      label_indices: ascending label indices that have matrices.
      counts: number of pairs of each label in `label_indices`.
      label_names: name of each label in `label_indices`.
      pair_names: ``(physiological, pathological)`` image names of every pair ("" if unknown).
      source_species: species the maps were learned in (e.g. "pig").
      state: the pathology or state they model (e.g. "malperfusion", "ICG").
    """

    weights: jax.Array
    biases: jax.Array
    losses: jax.Array
    label_indices: tuple[int, ...]
    counts: tuple[int, ...]
    label_names: tuple[str, ...]
    pair_names: tuple[tuple[str, str], ...]
    source_species: str = ""
    state: str = ""

    def __post_init__(self):
        if not self.label_indices:
            raise ValueError("a projection bank needs at least one label with matrices")
        if len(self.counts) != len(self.label_indices) or len(self.label_names) != len(
                self.label_indices):
            raise ValueError(f"counts {self.counts} and label_names {self.label_names} must have "
                             f"one entry per label index {self.label_indices}")
        if list(self.label_indices) != sorted(set(self.label_indices)):
            raise ValueError(f"label_indices must be ascending and unique, got "
                             f"{self.label_indices}")
        if min(self.counts) < 1:
            raise ValueError(f"every label needs at least one pair, got counts {self.counts}")
        if len(self.pair_names) != sum(self.counts):
            raise ValueError(f"expected {sum(self.counts)} pair names, got {len(self.pair_names)}")
        self._check_finite()

    def _check_finite(self) -> None:
        """Rejects NaN/Inf in host (NumPy) weights and biases, naming the label (policy above)."""
        for name in ("weights", "biases"):
            values = getattr(self, name)
            if not isinstance(values, np.ndarray) or np.isfinite(values).all():
                continue  # device arrays and tracers are not checked (module docstring)
            bad = ~np.isfinite(values.reshape(len(values), -1))
            per_label = np.add.reduceat(bad.sum(1), self.offsets)
            where = ", ".join(f"label {label} ({label_name}): {n} values"
                              for label, label_name, n in zip(self.label_indices,
                                                              self.label_names, per_label,
                                                              strict=True) if n)
            raise ValueError(f"the bank's {name} hold NaN or Inf ({where}); every W and b must "
                             "be finite")

    @property
    def num_channels(self) -> int:
        return self.weights.shape[-1]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Index of each label's first pair in the stacks."""
        return tuple(int(x) for x in np.cumsum((0, *self.counts[:-1])))

    def pairs(self, label_index: int) -> tuple[jax.Array, jax.Array]:
        """``(W (n, C, C), b (n, C))`` of one label index."""
        if label_index not in self.label_indices:
            raise ValueError(f"label index {label_index} has no matrices; the bank has "
                             f"{self.label_indices}")
        k = self.label_indices.index(label_index)
        start = self.offsets[k]
        stop = start + self.counts[k]
        return self.weights[start:stop], self.biases[start:stop]

    @classmethod
    def from_pairs(cls, pairs: Mapping[int, tuple], *, losses: Mapping[int, Sequence] | None = None,
                   pair_names: Mapping[int, Sequence[tuple[str, str]]] | None = None,
                   label_names: Mapping[int, str] | None = None, source_species: str = "",
                   state: str = "") -> ProjectionBank:
        """Builds a bank from ``{label_index: (W (n, C, C), b (n, C))}``.

        Args:
          pairs: the maps of every label index.
          losses: optional ``{label_index: (n,) losses}``; NaN where missing.
          pair_names: optional ``{label_index: [(physiological, pathological), ...]}``.
          label_names: optional ``{label_index: name}``; defaults to ``str(index)``.
          source_species: provenance.
          state: provenance.

        Returns:
          The bank, labels in ascending order, arrays as float32 NumPy arrays.
        """
        if not pairs:
            raise ValueError("a projection bank needs at least one label with matrices")
        losses, pair_names, label_names = losses or {}, pair_names or {}, label_names or {}
        labels = sorted(pairs)
        weights, biases, all_losses, all_names, counts = [], [], [], [], []
        for label in labels:
            w, b = (np.asarray(x, np.float32) for x in pairs[label])
            n = w.shape[0] if w.ndim else 0
            if w.ndim != 3 or w.shape[1] != w.shape[2] or b.shape != (n, w.shape[-1]):
                raise ValueError(f"label {label}: expected W (n, C, C) and b (n, C), got "
                                 f"{w.shape} and {b.shape}")
            loss = np.asarray(losses.get(label, np.full(n, np.nan)), np.float32)
            names = [tuple(p) for p in pair_names.get(label, [("", "")] * n)]
            if loss.shape != (n,) or len(names) != n:
                raise ValueError(f"label {label}: {n} pairs but {loss.shape} losses and "
                                 f"{len(names)} pair names")
            weights.append(w)
            biases.append(b)
            all_losses.append(loss)
            all_names += names
            counts.append(n)
        if len({w.shape[1:] for w in weights}) > 1:
            shapes = {lab: w.shape[1:] for lab, w in zip(labels, weights, strict=True)}
            raise ValueError(f"all labels need the same number of channels, got {shapes}")
        return cls(
            weights=np.concatenate(weights),
            biases=np.concatenate(biases),
            losses=np.concatenate(all_losses),
            label_indices=tuple(int(x) for x in labels),
            counts=tuple(counts),
            label_names=tuple(str(label_names.get(lab, lab)) for lab in labels),
            pair_names=tuple((str(a), str(b)) for a, b in all_names),
            source_species=source_species,
            state=state,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the bank to an HDF5 file (layout in the module docstring), atomically."""
        weights, biases, losses = (np.asarray(x, np.float32)
                                   for x in (self.weights, self.biases, self.losses))
        with atomic_write(path) as file, h5py.File(file, "w") as f:
            f.attrs.update(format=FORMAT, version=VERSION, source_species=self.source_species,
                           state=self.state, num_channels=self.num_channels)
            groups = f.create_group("labels")
            for k, label in enumerate(self.label_indices):
                start = self.offsets[k]
                part = slice(start, start + self.counts[k])
                group = groups.create_group(str(label))
                group.attrs["name"] = self.label_names[k]
                group.create_dataset("weights", data=weights[part])
                group.create_dataset("biases", data=biases[part])
                group.create_dataset("losses", data=losses[part])
                group.create_dataset("pair_names", data=np.array(self.pair_names[part],
                                                                 dtype=object).reshape(-1, 2),
                                     dtype=h5py.string_dtype())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProjectionBank:
        """Reads a bank written by `save`.

        Raises:
          ValueError: naming the file and what is wrong if it is not such a bank (or holds NaN
            or Inf matrices).
        """
        path = Path(path)
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(f"{path}: not an HDF5 file ({e})") from None
        with f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{path}: the format attribute is {f.attrs.get('format')!r}, "
                                 f"expected {FORMAT!r}")
            if f.attrs.get("version") != VERSION:
                raise ValueError(f"{path}: version {f.attrs.get('version')!r}, this code reads "
                                 f"version {VERSION}")
            pairs, losses, names, label_names = {}, {}, {}, {}
            for key, group in f.get("labels", {}).items():
                if not key.isdigit():
                    raise ValueError(f"{path}: the group /labels/{key} is not a label index")
                missing = {"weights", "biases", "losses", "pair_names"} - set(group)
                if missing:
                    raise ValueError(f"{path}: /labels/{key} lacks {sorted(missing)}")
                label = int(key)
                pairs[label] = (group["weights"][()], group["biases"][()])
                losses[label] = group["losses"][()]
                names[label] = [tuple(p) for p in group["pair_names"].asstr()[()]]
                label_names[label] = str(group.attrs.get("name", key))
            try:
                return cls.from_pairs(pairs, losses=losses, pair_names=names,
                                      label_names=label_names,
                                      source_species=str(f.attrs.get("source_species", "")),
                                      state=str(f.attrs.get("state", "")))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_htc(cls, path: str | os.PathLike, label_mapping: LabelMapping, *,
                 target_labels: Collection[str] | None = None, source_species: str | None = None,
                 state: str | None = None) -> ProjectionBank:
        """Reads a reference-implementation bank ``<name>.blosc`` (and ``<name>.json`` if present).

        The blosc file is read without executing pickled code (`xeno_jax.io.htc.read_blosc`).
        Every label name is mapped to its training index; names sharing an index (``meso`` and
        ``small_bowel``) have their pairs concatenated in file order.

        Args:
          path: the ``.blosc`` file: ``{label_name: float32 [n, C, C + 1]}``, bias last column.
          label_mapping: label names -> training indices (e.g. `xeno_jax.labels.SPECIES_12`).
          target_labels: keep only these label names (as the reference's ``target_labels``).
          source_species: provenance; parsed from reference file names
            (``weights+bias_<state>_<species>_...``) when not given.
          state: provenance, likewise.

        Returns:
          The bank.

        Raises:
          ValueError: naming the file, for unsafe or corrupt files, label names the mapping does
            not know (unless filtered out by `target_labels`), arrays of the wrong shape, NaN or
            Inf in the matrices, or a sidecar that does not match the matrices.
        """
        from xeno_jax.io.htc import read_blosc

        path = Path(path)
        data = read_blosc(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: holds a single array, expected a dict "
                             "{label_name: [n, C, C + 1]}")
        sidecar = _read_sidecar(path.with_suffix(".json"))
        if target_labels is not None:
            data = {name: t for name, t in data.items() if name in set(target_labels)}
        unknown = [name for name in data if not label_mapping.is_valid(
            label_mapping.name_to_index(name))]
        if unknown:
            raise ValueError(f"{path}: the label mapping has no valid index for the labels "
                             f"{unknown}; pass target_labels to drop them")
        if not data:
            raise ValueError(f"{path}: no labels left (target_labels={target_labels})")
        grouped: dict[int, list[str]] = {}
        for name in data:
            grouped.setdefault(label_mapping.name_to_index(name), []).append(name)
        pairs, losses, names = {}, {}, {}
        for index, label_names in grouped.items():
            stacks = []
            for name in label_names:
                t = np.asarray(data[name])
                if t.ndim != 3 or t.shape[2] != t.shape[1] + 1:
                    raise ValueError(f"{path} [{name!r}]: expected a [n, C, C + 1] array, got "
                                     f"{t.shape}")
                stacks.append(t.astype(np.float32))
            t = np.concatenate(stacks)
            pairs[index] = (t[:, :, :-1], t[:, :, -1])
            records = [r for name in label_names for r in sidecar.get(name, [])]
            if sidecar and len(records) != len(t):
                raise ValueError(f"{path.with_suffix('.json')}: {len(records)} records for "
                                 f"{label_names}, the matrices have {len(t)} pairs")
            if records:
                losses[index] = [float(r.get("loss", np.nan)) for r in records]
                names[index] = [(str(r.get("name_physiological", "")),
                                 str(r.get("name_ischemic", ""))) for r in records]
        parsed = _REFERENCE_NAME.match(path.stem)
        try:
            return cls.from_pairs(
                pairs, losses=losses, pair_names=names,
                label_names={i: label_mapping.index_to_name(i) for i in grouped},
                source_species=source_species if source_species is not None
                else (parsed["species"] if parsed else ""),
                state=state if state is not None else (parsed["state"] if parsed else ""))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _read_sidecar(path: Path) -> dict[str, list[dict]]:
    """The reference's ``{label_name: [{name_physiological, name_ischemic, loss}, ...]}``."""
    if not path.exists():
        return {}
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(sidecar, dict) and all(
            isinstance(v, list) and all(isinstance(r, dict) for r in v)
            for v in sidecar.values())):
        raise ValueError(f"{path}: expected {{label_name: [{{name_physiological, name_ischemic, "
                         "loss}, ...]}}")
    return sidecar


jax.tree_util.register_dataclass(
    ProjectionBank,
    data_fields=["weights", "biases", "losses"],
    meta_fields=["label_indices", "counts", "label_names", "pair_names", "source_species",
                 "state"],
)
