"""Input pipelines: grain over ``tfds.data_source`` to global, device-sharded batches.

Training: the label-balanced sampler picks the records of global batch ``s``; each process
reads only its own rows of it (``jax.process_index``), grain reads them with a thread pool and
batches them, and a prefetching device stage places each batch on the ``"data"`` mesh as global
``jax.Array``s, L1-normalising the float16 cubes on the devices (the reference's preprocessing)
so that only half the bytes cross to the device. The iterator is grain's: ``get_state()`` is its
position, ``set_state`` restores it, and a resumed run sees exactly the batches it would have
seen (prefetched batches are accounted for by grain's prefetch stage).

Evaluation: `evaluation_batches` yields an image list in order, in padded batches.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import grain
import grain.experimental
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from xeno_jax.data.catalog import Catalog, Record
from xeno_jax.data.sampling import LabelBalancedSampler
from xeno_jax.spectra import l1_normalize
from xeno_jax.train.parallel import batch_sharding, shard_batch

_ENDLESS = 2**40  # samples in the training stream (it never runs out)


def example_to_batch_row(example: dict) -> dict[str, np.ndarray]:
    """The fields training needs, as stored: float16 cube, uint8 labels, bool valid mask."""
    return {"features": np.asarray(example["cube"]), "labels": np.asarray(example["labels"]),
            "valid": np.asarray(example["valid"])}


@functools.cache
def _prepare(sharding):
    @functools.partial(jax.jit, out_shardings=sharding)
    def prepare(batch):
        features = l1_normalize(batch["features"].astype(jnp.float32))
        return {"features": features, "labels": batch["labels"].astype(jnp.int32),
                "valid": batch["valid"]}
    return prepare


def to_device(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays on the mesh: L1 float32 features, int32 labels."""
    return _prepare(batch_sharding(mesh))(shard_batch(batch, mesh))


def train_iterator(catalog: Catalog, records: Sequence[Record], *, batch_size: int, mesh: Mesh,
                   seed: int = 0, domain: str | None = None, num_threads: int = 4,
                   host_prefetch: int = 8, device_prefetch: int = 2):
    """An endless, resumable iterator of label-balanced training batches.

    Args:
      catalog: where the records are read from.
      records: the training images.
      batch_size: global batch size (divisible by the number of processes).
      mesh: the data mesh the batches are sharded over.
      seed: seed of the sampler.
      domain: sampler domains (``"species"`` for the joint model).
      num_threads, host_prefetch: grain's reader threads and host-side buffer.
      device_prefetch: batches placed on the devices ahead of use.

    Returns:
      A grain ``DatasetIterator`` of batches ``{"features", "labels", "valid"}`` (global
      arrays), with ``get_state`` / ``set_state``.
    """
    processes, process = jax.process_count(), jax.process_index()
    if batch_size % processes:
        raise ValueError(f"batch_size {batch_size} is not divisible by {processes} processes")
    local = batch_size // processes
    sampler = LabelBalancedSampler(records, batch_size, seed=seed, domain=domain)
    batch_records = functools.lru_cache(maxsize=256)(sampler.batch)

    def read(position: int) -> dict[str, np.ndarray]:
        step, row = divmod(position, local)
        record = sampler.records[batch_records(step)[process * local + row]]
        return example_to_batch_row(catalog.read(record))

    dataset = (grain.MapDataset.range(_ENDLESS).map(read).batch(local)
               .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                  prefetch_buffer_size=host_prefetch))
               .map(functools.partial(to_device, mesh=mesh)))
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=device_prefetch)
    return iter(dataset)


def evaluation_batches(catalog: Catalog, records: Sequence[Record], batch_size: int,
                       *, num_threads: int = 4) -> Iterator[tuple[list[Record], dict]]:
    """Host batches of `records` in order (the last one padded by repeating its last image).

    Yields:
      ``(records of the batch without padding, {"features" L1 float32, "labels", "valid",
      "vendor_sto2" (the vendor's StO2 image of real data that has it, else NaN), and the
      simulated "saturation" map and "labels_full" (every pixel's class) if the dataset has
      them})``.
    """
    def read(record: Record) -> dict[str, np.ndarray]:
        example = catalog.read(record)
        row = example_to_batch_row(example)
        row["features"] = l1_normalize(row["features"].astype(np.float32))
        row["labels"] = row["labels"].astype(np.int32)
        vendor = catalog.vendor_index(record, example)
        row["vendor_sto2"] = (np.full(row["labels"].shape, np.nan, np.float32) if vendor is None
                              else vendor)
        if "saturation" in example:
            row["saturation"] = np.asarray(example["saturation"], np.float32)
        if "labels_full" in example:
            row["labels_full"] = np.asarray(example["labels_full"], np.int32)
        return row

    records = list(records)
    padded = records + [records[-1]] * (-len(records) % batch_size) if records else []
    rows = (grain.MapDataset.source(padded).map(read).batch(batch_size)
            .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)))
    for start, batch in zip(range(0, len(records), batch_size), rows, strict=False):
        yield records[start:start + batch_size], batch
