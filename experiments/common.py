"""What every entry point does first: logging, and multi-host set-up when asked."""

import logging
import os
from pathlib import Path

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (one process per host; the "
    "coordinator is found from the environment, e.g. on TPU pods and SLURM).")


def _not_orbax_info(record: logging.LogRecord) -> bool:
    """Orbax logs every file of every checkpoint at INFO; its warnings and errors pass."""
    return record.levelno > logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


def start() -> None:
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").addFilter(_not_orbax_info)  # orbax logs through absl.logging
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)


def resolve_study(config, workdir: str):
    """A study config with its data directory defaulting to ``<workdir>/tfds`` and its run
    config file as an absolute path (workers and jobs may start elsewhere)."""
    with config.unlocked():
        if not config.data_dir:
            config.data_dir = str(Path(workdir).resolve() / "tfds")
        config.run_config = str(Path(config.run_config).expanduser().resolve())
    if not Path(config.run_config).is_file():
        raise FileNotFoundError(f"config.run_config: no run config file {config.run_config}")
    return config
