"""The joint baseline: human plus physiological pig and rat images (A3).

  python -m experiments.train --config=experiments/configs/joint.py:pig-p+rat-p2human \
      --workdir=runs/joint
  python -m experiments.train --config=experiments/configs/joint.py:pig-p+rat-p2human,quick \
      --workdir=runs/joint_quick
"""

from experiments.configs import run


def get_config(arg: str = "pig-p+rat-p2human"):
    what, _, options = (arg or "").partition(",")
    return run.get_config(f"joint_{what},{options}")
