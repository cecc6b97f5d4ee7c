"""Test set-up, before JAX is imported: eight fake CPU devices for the data-parallel paths.

No persistent compilation cache: shared by the pytest-xdist workers and the subprocesses of the
multi-process tests it saved compilations, but test workers died in CI and in clean-clone runs
with "Fatal Python error: Aborted" inside a compiled program's first call (where a cached
executable is loaded), and a crash in a test run is worse than a slower one."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
