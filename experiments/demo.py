"""The demo (`make demo`): xeno-learning on the simulated default data, end to end on a CPU.

Renders the simulator figures, then runs the demo study (experiments/configs/study.py:demo):
builds the human and pig sim_small datasets if missing, learns pig malperfusion (kidney)
projections and the rule's StO2 threshold, trains baseline_human,
projected-malperfusion_pig2human and its random control with quick settings, evaluates them
and the rule on human physiological and malperfused-kidney test images, writes
<workdir>/report.md and prints its key table, the transfer minus its controls and the
full-label scores. A second run reuses everything.

  python -m experiments.demo --workdir=workdir
"""

import logging
from pathlib import Path

from absl import app, flags

from experiments import common
from experiments.configs import study as study_config
from xeno_jax.simulate import figures
from xeno_jax.study.study import run_study

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Work directory of the demo.")


def main(argv):
    del argv
    common.start()
    workdir = Path(_WORKDIR.value)
    if not (workdir / "figures" / "simulator_scenes.png").exists():
        logging.info("rendering the simulator figures")
        figures.render(workdir / "figures")
    report = run_study(common.resolve_study(study_config.get_config("demo"), str(workdir)), workdir)
    sections = ["## " + part.strip() for part in report.read_text().split("\n## ")[1:]]
    shown = [part for part in sections if part.startswith(
        ("## Key results", "## Xeno-learning minus its controls", "## Full labels"))]
    print("\n" + "\n\n".join(shown) + f"\n\nFull report: {report}\n")


if __name__ == "__main__":
    app.run(main)
