"""Builds the species datasets a config needs (skipping those already built), with progress.

  python -m experiments.build_data --species=human,pig --dataset=sim_small
  python -m experiments.build_data --study_config=experiments/configs/study.py:demo \
      --data_dir=workdir/tfds
  python -m experiments.build_data --species=pig --dataset=tivita --manual_dir=/data/pig_tivita \
      --data_dir=/data/tfds [--skip_invalid] [--annotations=semantic#primary,polygon#annotator1]
  python -m experiments.build_data --species=pig --dataset=tivita ... \
      --beam_pipeline_options=runner=DirectRunner,direct_num_workers=2   (Apache Beam: the extra)

Real-data options (``--dataset=tivita``): see ``python -m data_builders`` and the builder README.
"""

import logging

import tensorflow_datasets as tfds
from absl import app, flags
from ml_collections import config_flags

import data_builders
from data_builders.tivita_data import parse_options
from experiments import common
from xeno_jax.study.study import species_involved

_SPECIES = flags.DEFINE_list("species", [], "Species to build (default: all, or the study's).")
_DATASET = flags.DEFINE_string("dataset", "sim_small", "Builder config: sim_small, sim_full, "
                               "tivita (or the study config's).")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data directory.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Real data for the tivita config.")
_STUDY = config_flags.DEFINE_config_file("study_config", None, "Build what this study needs.")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False, "tivita: build without bad images "
                                  "(recorded in the metadata) instead of failing.")
_BEAM = flags.DEFINE_string("beam_pipeline_options", None, "Build on Apache Beam (the `beam` "
                            "extra) with these comma-separated pipeline options, as TFDS's "
                            "command: runner=DirectRunner,direct_num_workers=2, "
                            "runner=DataflowRunner,project=...,region=...,temp_location=gs://...")
_REAL = {name: flags.DEFINE_string(name, None, help) for name, help in (
    ("annotations", "tivita: annotation names kept, comma-separated; the first is `labels`."),
    ("images", "tivita: only these image names (comma-separated, optional @<annotation>)."),
    ("cube_source", "tivita: auto (L1 files if all images have them), L1 or dat."),
    ("label_aliases", "tivita: dataset_name:12_class_name pairs, comma-separated."),
    ("ignored_labels", "tivita: dataset label names that become invalid."),
    ("ignored_label_ids", "tivita: label ids without a name that become invalid."))}


def main(argv):
    del argv
    common.start()
    species, dataset = _SPECIES.value, _DATASET.value
    if _STUDY.value is not None:
        species = species or species_involved(_STUDY.value.configurations,
                                               _STUDY.value.test_sets)
        dataset = _STUDY.value.dataset
    options = {k: f.value for k, f in _REAL.items() if f.value is not None}
    if _SKIP_INVALID.value:
        options["skip_invalid"] = "true"
    if options and dataset != "tivita":
        raise app.UsageError(f"--{', --'.join(sorted(options))}: options of --dataset=tivita")
    extra = {"real_data": parse_options(options)} if options else {}
    beam = data_builders.beam_options(_BEAM.value) if _BEAM.value else None
    for name in species or data_builders.SPECIES:
        builder = data_builders.builder(name, dataset, data_dir=_DATA_DIR.value, **extra)
        if builder.is_prepared():
            logging.info("%s/%s: already built in %s", name, dataset, builder.data_dir)
            continue
        download_config = tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value,
                                                       beam_options=beam)
        builder.download_and_prepare(download_config=download_config)
        logging.info("%s/%s: %s", name, dataset,
                     {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == "__main__":
    app.run(main)
