"""Test set-up, before JAX is imported: eight fake CPU devices for the data-parallel paths, and
a persistent compilation cache shared by the test processes (pytest-xdist workers and the
subprocesses of the multi-process tests), so that a program compiled once, such as the
augmentation pipeline of the training runs, is not compiled again by every run."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "xeno_jax_tests_compilation_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))  # bytes, oldest go
