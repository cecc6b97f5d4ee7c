"""``tfds build`` without TensorFlow: ``python -m data_builders build data_builders/pig ...``.

TFDS 4.9's ``tfds`` command imports TensorFlow at start-up (for its ``convert_format``
command), although building ArrayRecord datasets does not need it. This is the same ``build``
command with the same arguments, e.g.::

  python -m data_builders build data_builders/pig --config=sim_small --data_dir=~/tfds
  python -m data_builders build data_builders/human --config=tivita \
      --manual_dir=/data/human_tivita --data_dir=~/tfds
"""

import dataclasses

import simple_parsing
from absl import app
from tensorflow_datasets.scripts.cli import build, cli_utils


@dataclasses.dataclass(frozen=True, kw_only=True)
class Args(cli_utils.Args):
    """Builds TFDS datasets (TFDS's `build` command)."""

    command: build.Args = simple_parsing.subparsers({"build": build.Args})  # noqa: RUF009

    def execute(self) -> None:
        self.command.execute()


def main(args: Args) -> None:
    args.execute()


if __name__ == "__main__":
    app.run(main, flags_parser=cli_utils.make_flags_parser(Args, description=__doc__))
