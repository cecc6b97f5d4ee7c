"""What every entry point does first: logging, and multi-host set-up when asked."""

import logging

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (one process per host; the "
    "coordinator is found from the environment, e.g. on TPU pods and SLURM).")


def start() -> None:
    logging.getLogger().setLevel(logging.INFO)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
