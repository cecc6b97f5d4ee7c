"""The divergence sweep (`xeno_jax.study.divergence`): the kidney transfer from pig to human
and its controls, with the human's malperfusion responses placed at several response
divergences from the pig's.

Argument: the study config argument of each point (default ``controls``: three networks per
configuration, quick CPU settings; see experiments/configs/study.py), e.g.::

  python -m experiments.sweep_divergence --workdir=sweep
  python -m experiments.sweep_divergence \
      --config=experiments/configs/sweep_divergence.py:controls,sim_full \
      --config.divergences='(0.0,1.0,3.0)' --config.study.folds='(0,1,2,3,4)' \
      --workdir=sweep_full
"""

import ml_collections

from experiments.configs import study


def get_config(arg: str = "controls") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.study = study.get_config(arg or "controls")  # each point's study
    with config.study.unlocked():
        config.study.test_sets = ("physiological", "malperfusion")
    config.source = "pig"  # the species the transferred maps are learnt in
    config.target = "human"  # the species whose responses are moved
    config.pathology = "malperfusion"
    # 0: the pig's responses on human physiology; 1: the human's own (the default data); by 4
    # every response parameter has reached a limit of its range (simulate.RESPONSE_LIMITS).
    config.divergences = (0.0, 1.0, 2.0, 4.0)
    config.lock()
    return config
