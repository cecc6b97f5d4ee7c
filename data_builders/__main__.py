"""``tfds build`` without TensorFlow: ``python -m data_builders build data_builders/pig ...``.

TFDS 4.9's ``tfds`` command imports TensorFlow at start-up (for its ``convert_format``
command), although building ArrayRecord datasets does not need it. This is the same ``build``
command with the same arguments, e.g.::

  python -m data_builders build data_builders/pig --config=sim_small --data_dir=~/tfds
  python -m data_builders build data_builders/human --config=tivita \
      --manual_dir=/data/human_tivita --data_dir=~/tfds

plus the real-data options of the ``tivita`` config (`tivita_data.RealDataOptions`)::

  --skip_invalid                 build without bad images (recorded in the metadata)
  --annotations=semantic#primary,polygon#annotator1   annotations kept; the first is `labels`
  --images=P041#2019_12_14_12_00_00@semantic#reannotation,...   only these images
  --cube_source=auto|L1|dat      the reference's L1 files or the .dat cubes
  --label_aliases=kidnee:kidney  --ignored_labels=heart_valve  --ignored_label_ids=254

TFDS's ``--beam_pipeline_options`` runs the build on Apache Beam (the ``beam`` extra), e.g.
``--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2`` on this machine, or
``runner=DataflowRunner,project=...,region=...,temp_location=gs://...``, ``runner=SparkRunner``,
``runner=FlinkRunner,flink_master=host:8081`` (see the builder README).
"""

import dataclasses
import sys

import simple_parsing
from absl import app
from tensorflow_datasets.scripts.cli import build, cli_utils

import data_builders
from data_builders.species_builder import SpeciesBuilder
from data_builders.tivita_data import OPTION_NAMES, parse_options


@dataclasses.dataclass(frozen=True, kw_only=True)
class Args(cli_utils.Args):
    """Builds TFDS datasets (TFDS's `build` command)."""

    command: build.Args = simple_parsing.subparsers({"build": build.Args})  # noqa: RUF009

    def execute(self) -> None:
        self.command.execute()


def take_real_data_options(argv: list[str]) -> list[str]:
    """Removes the real-data options from `argv` and makes them the builders' default."""
    options, rest = {}, []
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and key in OPTION_NAMES:
            options[key] = value if sep else ""
        else:
            rest.append(arg)
    if options:
        SpeciesBuilder.DEFAULT_REAL_DATA = parse_options(options)
    return rest


def require_beam_if_asked(argv: list[str]) -> None:
    """Exits naming the ``beam`` extra if `argv` asks for a Beam build and Beam is missing
    (TFDS's command would quietly build in this process instead)."""
    if any(arg.startswith("--beam_pipeline_options") for arg in argv):
        try:
            data_builders.import_beam()
        except ImportError as e:
            sys.exit(f"--beam_pipeline_options: {e}")


def main(args: Args) -> None:
    args.execute()


if __name__ == "__main__":
    sys.argv = take_real_data_options(sys.argv)
    require_beam_if_asked(sys.argv)
    app.run(main, flags_parser=cli_utils.make_flags_parser(Args, description=__doc__))
