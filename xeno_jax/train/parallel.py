"""Data parallelism: one device mesh axis "data", two launchers for one per-device function.

Per-device functions (the train step, the eval step) are written once in the pmap programming
model: they see their device's slice of the batch and combine results with collectives over
`DATA_AXIS` (``lax.pmean`` of gradients, ``lax.psum`` of loss sums). `data_parallel` launches
such a function either with ``jax.shard_map`` under ``jax.jit`` (the default) or with
``jax.pmap``; both give the same numbers.

Layouts. Whatever the launcher, the loop holds the same global ``jax.Array``s:

* the replicated arguments (the train state, model variables, constants such as a projection
  bank): ``NamedSharding(mesh, P())``;
* batches: leading dimension sharded over the mesh, ``NamedSharding(mesh, P("data"))``,
  built from each process's local rows with `shard_batch`.

Functions of the whole global batch (the training augmentation) run with `on_global_batch`:
``jax.jit`` over these layouts, so that their result does not depend on how many devices or
processes hold the rows.

Under pmap (which JAX now implements as jit over shard_map) the replicated argument is passed
unmapped (``in_axes=None``, ``out_axes=None``), so it keeps this layout and is donated without a
copy, and the batch gets pmap's leading device axis by a jitted reshape that moves no data. The
old replicate/unreplicate idiom (stacking a copy of the state per device and indexing ``[0]``
to read it) is not used.

Multi-host: the entry point calls ``jax.distributed.initialize()``; every process then builds
the same mesh over all devices, feeds its own rows of each batch, and runs the same program.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
BACKENDS = ("shard_map", "pmap")


def make_mesh(num_devices: int = 0) -> Mesh:
    """A one-axis mesh named `DATA_AXIS`.

    Args:
      num_devices: use the first `num_devices` devices; 0 means all (over all processes).

    Returns:
      The mesh.
    """
    devices = jax.devices()
    if num_devices:
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=devices)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a batch on the mesh as global arrays sharded along their leading dimension.

    Args:
      batch: arrays with a leading batch dimension, either host arrays holding this process's
        rows (every process passes its own, equally many) or global ``jax.Array``s, which are
        kept if already sharded over the mesh and resharded otherwise.
      mesh: the data mesh.

    Returns:
      The batch as global arrays with ``NamedSharding(mesh, P("data"))``.

    Raises:
      ValueError: if the local rows cannot be split evenly over this process's devices.
    """
    sharding = batch_sharding(mesh)
    local_devices = len(mesh.local_devices)

    def put(name: str, x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
            return jax.device_put(x, sharding)  # no copy if already laid out so
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local_devices:
            raise ValueError(
                f"batch[{name!r}] has shape {x.shape}; its leading (batch) dimension must be a "
                f"multiple of the {local_devices} local devices of the data mesh"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return {name: put(name, x) for name, x in batch.items()}


def data_parallel(
    per_device_fn: Callable[..., Any],
    mesh: Mesh,
    *,
    backend: str = "shard_map",
    sharded_output: bool = False,
    donate: bool = False,
    prepare: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """Launches ``per_device_fn(replicated, batch, *constants)`` on every device of the mesh.

    Args:
      per_device_fn: function of a replicated pytree, this device's slice of the batch and any
        further replicated arguments ("constants", such as a projection bank); it may use
        collectives over `DATA_AXIS`.
      mesh: the data mesh.
      backend: "shard_map" (``jit`` of ``shard_map``) or "pmap".
      sharded_output: the outputs are per-device rows concatenated along the leading dimension
        (predictions); otherwise they are the same on every device (state, metrics).
      donate: donate the first argument (the train state) to the computation; constants are
        never donated.
      prepare: a function of the whole global batch, ``prepare(batch, *prepare_args) ->
        batch`` (the training augmentation), applied before the per-device function: in the
        same program under shard_map, as its own `on_global_batch` program under pmap. Its
        result is that of one device holding every row (module docstring).

    Returns:
      ``fn(replicated, batch, *constants)`` taking and returning global arrays in the layouts
      of the module docstring; with `prepare`, ``fn(replicated, batch, prepare_args,
      *constants)``.
    """
    out_spec = P(DATA_AXIS) if sharded_output else P()
    donate_argnums = (0,) if donate else ()

    def per_device(replicated: Any, batch: Any, constants: tuple[Any, ...]) -> Any:
        return per_device_fn(replicated, batch, *constants)

    if backend == "shard_map":
        mapped = jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=out_spec
        )
        if prepare is None:
            program = jax.jit(mapped, donate_argnums=donate_argnums)
            return lambda replicated, batch, *constants: program(replicated, batch, constants)

        def prepared(replicated, batch, prepare_args, constants):
            batch = jax.lax.with_sharding_constraint(prepare(batch, *prepare_args),
                                                     batch_sharding(mesh))
            return mapped(replicated, batch, constants)

        program = jax.jit(prepared, donate_argnums=donate_argnums)
        return lambda replicated, batch, prepare_args, *constants: program(
            replicated, batch, prepare_args, constants)
    if backend != "pmap":
        raise ValueError(f"parallel backend must be one of {BACKENDS}, got {backend!r}")

    num_devices = mesh.devices.size
    pmapped = jax.pmap(
        per_device,
        axis_name=DATA_AXIS,
        in_axes=(None, 0, None),
        out_axes=0 if sharded_output else None,
        donate_argnums=donate_argnums,
        devices=list(mesh.devices.flat),
    )
    split_devices = jax.jit(
        lambda tree: jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), tree),
        out_shardings=batch_sharding(mesh),
    )
    merge_devices = jax.jit(
        lambda tree: jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree),
        out_shardings=batch_sharding(mesh),
    )

    def run(replicated: Any, batch: Any, *constants: Any) -> Any:
        out = pmapped(replicated, split_devices(batch), constants)
        if jax.process_count() > 1:  # pmap hands back process-local views; make them global
            out = multihost_utils.host_local_array_to_global_array(out, mesh, out_spec)
        return merge_devices(out) if sharded_output else out

    if prepare is None:
        return run
    run_prepare = on_global_batch(prepare, mesh)
    return lambda replicated, batch, prepare_args, *constants: run(
        replicated, run_prepare(batch, *prepare_args), *constants)


def on_global_batch(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``jax.jit`` of a function of replicated arguments and global batches, returning a batch.

    The arguments keep their layouts (replicated or batch-sharded global arrays); XLA
    partitions the computation over the mesh and the result, sharded like a batch, equals that
    of a single device holding the whole batch, whatever the number of devices and processes.
    """
    return jax.jit(fn, out_shardings=batch_sharding(mesh))


def put_global_rows(x: Any, mesh: Mesh) -> jax.Array:
    """A host array holding all rows of a batch (the same on every process), as a global
    array sharded over the mesh; each device takes its rows."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def fetch_global_rows(x: jax.Array) -> np.ndarray:
    """All rows of a batch-sharded global array, as NumPy, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (the same on every process) on every device of the mesh; arrays
    already replicated over the mesh are kept as they are."""
    sharding = replicated_sharding(mesh)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)  # no copy if already laid out so
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def fetch_replicated(tree: Any) -> Any:
    """Host NumPy copy of a replicated pytree (works for multi-process global arrays)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
