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
