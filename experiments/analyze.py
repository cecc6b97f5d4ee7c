"""The paper's spectral analyses of a dataset: tables (markdown, CSV) and figures.

  python -m experiments.analyze --species=human,pig,rat --dataset=sim_small --workdir=analysis
  python -m experiments.analyze --species=pig --dataset=tivita --data_dir=/data/tfds \
      --analyses=spectra,transfer --workdir=analysis_real

Writes ``<workdir>/analysis.md``, its CSV tables and PNG figures, and ``organ_spectra.npz``
(the per-image organ spectra every analysis starts from; reused when the same datasets are
analysed again). Simulated datasets that are missing are built first.
"""

import hashlib
import json
import logging
import time
from pathlib import Path

import tensorflow_datasets as tfds
from absl import app, flags

from experiments import common
from xeno_jax import analysis
from xeno_jax.io import atomic_write
from xeno_jax.study import datasets

_SPECIES = flags.DEFINE_list("species", ["human", "pig", "rat"], "Species to analyse.")
_DATASET = flags.DEFINE_string("dataset", "sim_small", "Builder config (sim_small, tivita, ...).")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data directory.")
_ANALYSES = flags.DEFINE_list("analyses", list(analysis.ANALYSES),
                              f"Any of {', '.join(analysis.ANALYSES)}.")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Subject-bootstrap resamples (spectra, "
                                  "transfer similarity).")
_VARIANCE_RESAMPLES = flags.DEFINE_integer("variance_resamples", 20, "Subject-bootstrap "
                                           "refits of the variance decomposition.")
_PARTS = flags.DEFINE_integer("parts", 4, "Pixel subsets per organ and image (repeated "
                              "measures of the variance decomposition).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)


def organ_spectra(workdir: Path, species, dataset: str, data_dir: str, parts: int):
    """The per-image organ spectra of the datasets, cached in the work directory."""
    catalog = datasets.ensure_catalog(species, dataset, data_dir, splits=None)
    # Which build of each dataset: its folder and when its dataset_info.json was written.
    builds = {}
    for sp in species:
        folder = Path(tfds.builder(datasets.dataset_name(sp, dataset), data_dir=data_dir).data_dir)
        builds[sp] = [str(folder), (folder / "dataset_info.json").stat().st_mtime_ns]
    identity = json.dumps({"datasets": [str(r) for r in catalog.refs], "builds": builds,
                           "parts": parts, "images": len(catalog),
                           "extract": analysis.EXTRACT_VERSION}, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    path = workdir / f"organ_spectra.{digest}.npz"
    if path.exists():
        return analysis.OrganSpectra.load(path)
    table = analysis.extract(catalog, catalog.records, parts=parts)
    with atomic_write(path) as f:
        table.save(f)
    return table


def main(argv):
    del argv
    common.start()
    start = time.perf_counter()
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(_DATA_DIR.value).expanduser())
    table = organ_spectra(workdir, _SPECIES.value, _DATASET.value, data_dir, _PARTS.value)
    logging.info("%d organ rows of %d images in %.1f s", len(table),
                 len(set(table.image_name)), time.perf_counter() - start)
    text = analysis.write_analyses(table, _SPECIES.value, workdir, analyses=_ANALYSES.value,
                                   resamples=_RESAMPLES.value,
                                   variance_resamples=_VARIANCE_RESAMPLES.value)
    header = (f"# Spectral analyses of `{_DATASET.value}` ({', '.join(_SPECIES.value)})\n\n"
              f"{len(set(table.image_name))} images, {len(table)} (image, organ) rows.\n\n")
    with atomic_write(workdir / "analysis.md", text=True) as f:
        f.write(header + text)
    logging.info("wrote %s in %.1f s", workdir / "analysis.md", time.perf_counter() - start)


if __name__ == "__main__":
    app.run(main)
