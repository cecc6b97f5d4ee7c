"""The joint baseline: human plus physiological pig and rat images (A3).

  python -m experiments.train --config=experiments/configs/joint.py:pig-p+rat-p2human \
      --workdir=runs/joint
  python -m experiments.train --config=experiments/configs/joint.py:pig-p+rat-p2human,quick \
      --workdir=runs/joint_quick
"""

from xeno_jax.study.configurations import config_from_arg


def get_config(arg: str = "pig-p+rat-p2human"):
    return config_from_arg(arg, "joint")
