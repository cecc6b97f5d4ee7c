"""Test set-up, before JAX is imported: eight fake CPU devices for the data-parallel paths.

Test workers have died with "Fatal Python error: Aborted" inside multi-device programs of the
SWA batch-norm pass (in CI and in clean-clone runs, with and without a persistent compilation
cache; cause not found). Two precautions: no persistent compilation cache shared between
processes, and a long termination timeout of XLA's CPU collectives (by default XLA ends the
process when the devices of one collective do not all arrive in time, which eight fake devices
on two busy cores might not)."""

import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = f"{_flags} --xla_force_host_platform_device_count=8"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
    _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
os.environ["XLA_FLAGS"] = _flags.strip()


@pytest.fixture(scope="session")
def stored_examples():
    """A function: a built dataset's examples, split -> [(image name, {feature: (dtype, shape,
    bytes)})] in file order; two builds are equal exactly when they stored the same bytes in
    every feature of the same examples."""
    def raw(value):
        value = np.asarray(value)
        return value.dtype.str, value.shape, value.tobytes()

    def examples(builder) -> dict[str, list[tuple[str, dict]]]:
        return {split: [(row["image_name"].decode(), {k: raw(v) for k, v in row.items()})
                        for row in builder.as_data_source(split)]
                for split in sorted(builder.info.splits)}

    return examples


def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup``: sends the tests of one ``xdist_group`` to one worker (those that
    share the tiny study of tests/test_study.py, so it is made once).

    pytest-xdist marks a grouped test by appending ``@<group>`` to its node id, but with pytest
    >= 9.2 its write no longer takes effect (pytest-dev/pytest-xdist#1386) and the groups are
    silently spread over the workers; this writes the suffix the way pytest now stores ids,
    and does nothing where xdist's own write worked.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            from _pytest.nodeid import coerce_node_id  # pytest >= 9.2's structured ids

            item._id = coerce_node_id(item.nodeid + suffix)
