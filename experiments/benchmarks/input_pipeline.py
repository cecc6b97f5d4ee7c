"""Benchmark of the training input pipeline against the raw read speed of the same files.

Builds (once, reused if present) a small full-size simulated pig dataset (480 x 640 x 100,
float16 cubes of ~62 MB, ArrayRecord files written by TFDS; ~1.9 GB) and measures, in one run,
repetitions interleaved, page cache warm (every file of the split is read once first):

``measure`` (images per second of each path, the cores it kept busy, and ratios):
- raw: the serialized records of the same files as bytes, with array_record's own
  `ArrayRecordDataSource`, on one thread and on ``--threads`` threads ("parallel");
- decoded: the same records through ``tfds.data_source`` (bytes -> NumPy), ``--threads`` threads;
- pipeline: `xeno_jax.data.train_iterator` (label-balanced sampler, grain with ``--threads``
  reader threads, global `jax.Array`s, L1-normalised float32 features) in steady state: a fresh
  iterator per repetition, each batch blocked until ready. Grain's threads read whole batches,
  so batches come in waves of ``--threads``; the first wave is not timed, the next ``--waves``
  are. The issue's target is >= 0.5 of the raw parallel speed;
- the same pipeline reading with a zero-copy decoder (prototype, see `zero_copy_example`).

``diagnose``: the single-thread cost per image of every pipeline step (read, protobuf parse
and NumPy copies, batching, device_put, L1 on the device), as multiples of reading the bytes.

``allocator``: ``measure`` in child processes, alternating glibc's default heap and one that
keeps freed memory (MALLOC_TOP_PAD_, MALLOC_TRIM_THRESHOLD_): the ratios between the two.

    python experiments/benchmarks/input_pipeline.py                      # ~3 min (+3 min build)
    python experiments/benchmarks/input_pipeline.py --parts=measure,diagnose
    python experiments/benchmarks/input_pipeline.py --parts=allocator --repeats=2 --waves=1 --clean
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordReader

import data_builders
from data_builders.species_builder import SIM_SMALL
from xeno_jax.data import Catalog, to_device, train_iterator
from xeno_jax.data.pipeline import example_to_batch_row
from xeno_jax.train.parallel import make_mesh, shard_batch

DATASET = "pig/sim_bench"
SPLIT = "physiological"
IMAGE_BYTES = 480 * 640 * 100 * 2
RAW_1 = "raw bytes, 1 thread"
RAW_N = "raw bytes, parallel"
DECODED = "decoded (tfds), parallel"
PIPELINE = "pipeline"
PIPELINE_ZERO_COPY = "pipeline, zero-copy decode [proto]"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min), {os.cpu_count()} CPUs"


PADDED_MALLOC = {"MALLOC_TOP_PAD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def malloc_settings() -> str:
    """The glibc malloc environment variables in effect ("glibc defaults" if none)."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    return " ".join(settings) or "glibc defaults"


def build_dataset(data_dir: Path, images_per_set: int) -> Path:
    """The dataset's version folder, built with the project's pig builder if not there yet."""
    config = dataclasses.replace(SIM_SMALL, name="sim_bench", height=480, width=640,
                                 max_images_per_set=images_per_set,
                                 description="Full-size benchmark data.")
    builder = data_builders.builder_class("pig")(config=config, data_dir=str(data_dir),
                                                 file_format="array_record")
    folder = Path(builder.data_dir)
    if not (folder / "dataset_info.json").exists():
        print(f"building {DATASET} ({images_per_set} images per simulated set) in {folder} ...")
        start = time.perf_counter()
        builder.download_and_prepare()
        print(f"  built in {time.perf_counter() - start:.0f} s")
    return folder


def split_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob(f"pig-{SPLIT}.array_record-*"))


def warm_page_cache(files: Sequence[str]) -> int:
    total = 0
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


@dataclasses.dataclass
class Timing:
    images: int
    seconds: float
    cpu_seconds: float  # user + system, all threads of the process
    system: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cores(self) -> float:
        return self.cpu_seconds / self.seconds


def timed(images: int, fn: Callable[[], object]) -> Timing:
    before, start = os.times(), time.perf_counter()
    fn()
    after, seconds = os.times(), time.perf_counter() - start
    user, system = after.user - before.user, after.system - before.system
    return Timing(images, seconds, user + system, system)


def read_all(pool: concurrent.futures.Executor | None, read: Callable[[int], object],
             indices: Sequence[int]) -> list:
    return list(pool.map(read, indices) if pool else map(read, indices))


# -- prototype: decoding without copies ---------------------------------------------------------

def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, start, end) of the length-delimited fields of a protobuf message."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 2:
            size, pos = _varint(buf, pos)
            yield tag >> 3, pos, pos + size
            pos += size
        elif wire == 0:
            pos = _varint(buf, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def zero_copy_example(record: bytes, features, names=("cube", "labels", "valid")) -> dict:
    """The training features of a serialized tf.Example as NumPy views of `record` (no copies).

    Example.features(1) -> map entry(1): key(1), Feature(2) -> bytes_list(1) -> value(1). The
    same arrays as ``tfds`` decoding gives for these features, without its protobuf parse, the
    copies it makes of every (62 MB) bytes feature, and the decoding of unused features.
    """
    buf, row = memoryview(record), {}
    for _, start, end in _fields(buf, 0, len(buf)):
        for _, entry_start, entry_end in _fields(buf, start, end):
            key = None
            for number, a, b in _fields(buf, entry_start, entry_end):
                if number == 1:
                    key = bytes(buf[a:b]).decode()
                elif number == 2 and key in names:
                    (_, a, b), = _fields(buf, a, b)  # Feature.bytes_list
                    (_, a, b), = _fields(buf, a, b)  # BytesList.value
                    info = features[key]
                    dtype = np.dtype(info.np_dtype)
                    row[key] = np.frombuffer(record, dtype, count=(b - a) // dtype.itemsize,
                                             offset=a).reshape(info.shape)
    if set(row) != set(names):
        raise ValueError(f"record lacks the bytes features {sorted(set(names) - set(row))}")
    return row


def zero_copy_catalog(catalog: Catalog) -> Catalog:
    """A copy of `catalog` whose `read` (used by train_iterator) is `zero_copy_example`."""
    sources = catalog.sources
    lean = copy.copy(catalog)
    lean.read = lambda record: zero_copy_example(
        sources[record.source].data_source[record.index],
        sources[record.source].dataset_info.features)
    return lean


# -- measurements -------------------------------------------------------------------------------

def pipeline_steady_state(catalog, records, mesh, *, batch_size: int, threads: int, skip: int,
                          batches: int, seed: int) -> tuple[Timing, float]:
    """(timing of a fresh iterator's batches skip..batches, seconds to its first batch)."""
    iterator = train_iterator(catalog, records, batch_size=batch_size, mesh=mesh, seed=seed,
                              num_threads=threads)
    try:
        start = time.perf_counter()
        jax.block_until_ready(next(iterator))
        first = time.perf_counter() - start
        for _ in range(skip - 1):
            jax.block_until_ready(next(iterator))

        def consume():
            for _ in range(batches - skip):
                jax.block_until_ready(next(iterator))

        timing = timed((batches - skip) * batch_size, consume)
    finally:
        iterator.close()
        wait_until_idle()  # grain's close() leaves the reads in flight running
    return timing, first


def wait_until_idle(cores: float = 0.1, window: float = 0.25, timeout: float = 30.0) -> None:
    """Returns once this process uses less than `cores` CPUs over `window` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(os.times()[:2])
        time.sleep(window)
        if sum(os.times()[:2]) - before < cores * window:
            return


def measure(catalog, records, files, args) -> dict[str, list[Timing]]:
    """Raw, decoded and pipeline timings, repetitions interleaved."""
    source = catalog.sources[0]
    raw = ArrayRecordDataSource(files)
    if len(raw) != len(source):
        raise ValueError(f"{len(raw)} raw records but {len(source)} in the TFDS split")
    images = (args.batches - args.skip) * args.batch_size
    indices = [records[i % len(records)].index for i in range(images)]  # the pipeline's records
    mesh = make_mesh(0)
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        steps = {
            RAW_1: lambda: read_all(None, raw.__getitem__, indices),
            RAW_N: lambda: read_all(pool, raw.__getitem__, indices),
            DECODED: lambda: read_all(pool, source.__getitem__, indices),
        }
        pipelines = {name: functools.partial(
            pipeline_steady_state, c, records, mesh, batch_size=args.batch_size,
            threads=args.threads) for name, c in ((PIPELINE, catalog),
                                                  (PIPELINE_ZERO_COPY, zero_copy_catalog(catalog)))}
        pipelines[PIPELINE](skip=1, batches=2, seed=10_000)  # warm-up: compiles the device stage
        results = {name: [] for name in [*steps, *pipelines]}
        first_batch = []
        for rep in range(args.repeats):
            for name, fn in steps.items():
                results[name].append(timed(images, fn))
            for name, pipeline in pipelines.items():
                timing, first = pipeline(skip=args.skip, batches=args.batches, seed=rep)
                results[name].append(timing)
                first_batch += [first] if name == PIPELINE else []
    if args.json:
        return results
    print(f"\n1. Images per second ({images} images per repetition, {args.repeats} repetitions "
          f"interleaved, warm page cache; [CPU] = absolute figures of this machine)")
    print(f"  {'path':36s} {'images/s [CPU]':>14s} {'cube GB/s':>10s} {'cores busy':>10s} "
          f"{'x ' + RAW_N:>24s}")
    for name, timings in results.items():
        print(f"  {name:36s} {_median_rate(timings):14.2f} "
              f"{_median_rate(timings) * IMAGE_BYTES / 1e9:10.2f} "
              f"{np.median([t.cores for t in timings]):10.2f} "
              f"{_median_ratio(timings, results[RAW_N]):24.2f}")
    print("  ratios: median [min, max] over the repetitions")
    print(f"  pipeline / {RAW_N}: {_ratio_text(results[PIPELINE], results[RAW_N])}   "
          f"(target >= 0.5)")
    print(f"  pipeline / {RAW_1}: {_ratio_text(results[PIPELINE], results[RAW_1])}")
    print(f"  {PIPELINE_ZERO_COPY} / pipeline: "
          f"{_ratio_text(results[PIPELINE_ZERO_COPY], results[PIPELINE])}")
    print(f"  pipeline: first batch after {np.median(first_batch):.1f} s [CPU] (fresh "
          f"iterators; grain reads whole batches per thread)")
    return results


def _median_rate(timings: Sequence[Timing]) -> float:
    return float(np.median([t.rate for t in timings]))


def _median_ratio(timings: Sequence[Timing], reference: Sequence[Timing]) -> float:
    return float(np.median(_ratios(timings, reference)))


def _ratios(timings: Sequence[Timing], reference: Sequence[Timing]) -> list[float]:
    return [t.rate / r.rate for t, r in zip(timings, reference, strict=True)]


def _ratio_text(timings: Sequence[Timing], reference: Sequence[Timing]) -> str:
    """Median ratio of rates, with the range over the repetitions."""
    ratios = _ratios(timings, reference)
    return f"{np.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"


def allocator(args) -> None:
    """`measure` in child processes, alternately with glibc's defaults and `PADDED_MALLOC`."""
    settings = {"glibc defaults": {}, "padded heap": PADDED_MALLOC}
    rates = {name: [] for name in settings}
    command = [sys.executable, os.path.abspath(__file__), "--parts=measure", "--json",
               "--repeats=1", f"--data_dir={args.data_dir}", f"--experiment={args.experiment}",
               f"--batch_size={args.batch_size}", f"--threads={args.threads}",
               f"--waves={args.waves}",
               f"--images_per_set={args.images_per_set}"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for _ in range(args.repeats):
        for name, extra in settings.items():
            out = subprocess.run(command, env={**clean, **extra}, capture_output=True,
                                 text=True, check=True).stdout
            rates[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"\n3. The allocator: child processes alternating glibc's defaults and "
          f"{' '.join(f'{k}={v}' for k, v in PADDED_MALLOC.items())} ({args.repeats} each)")
    print(f"  {'path':36s}" + "".join(f" {n + ' img/s [CPU]':>28s}" for n in settings)
          + f" {'padded / defaults':>18s}")
    for path in rates["glibc defaults"][0]:
        line = f"  {path:36s}"
        for name in settings:
            line += f" {np.median([r[path] for r in rates[name]]):28.2f}"
        gain = np.median([p[path] / d[path] for p, d in zip(
            rates["padded heap"], rates["glibc defaults"], strict=True)])
        print(line + f" {gain:18.2f}")
    for name in settings:
        ratio = np.median([r[PIPELINE] / r[RAW_N] for r in rates[name]])
        print(f"  {name}: pipeline / {RAW_N} = {ratio:.2f} (target >= 0.5)")


def diagnose(catalog, records, files, args) -> None:
    """Single-thread cost per image of each pipeline step, interleaved over repetitions."""
    source = catalog.sources[0]
    raw = ArrayRecordDataSource(files)
    features = source.dataset_info.features
    mesh = make_mesh(0)
    batch_records = [records[i % len(records)] for i in range(args.batch_size)]
    serialized = [raw[r.index] for r in batch_records]
    rows = [example_to_batch_row(features.deserialize_example_np(s)) for s in serialized]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    jax.block_until_ready(to_device(batch, mesh))  # compiles the device stage
    for s, row in zip(serialized, rows, strict=True):
        lean = example_to_batch_row(zero_copy_example(s, features))
        if not all(np.array_equal(lean[k], row[k]) for k in row):
            raise ValueError("zero_copy_example disagrees with the TFDS decoding")
    steps = {
        "read bytes (zstd decompress)": lambda: [raw[r.index] for r in batch_records],
        "parse protobuf + NumPy copies": lambda: [features.deserialize_example_np(s)
                                                  for s in serialized],
        "zero-copy decode [prototype]": lambda: [zero_copy_example(s, features)
                                                 for s in serialized],
        "batch rows (np.stack)": lambda: {k: np.stack([row[k] for row in rows]) for k in rows[0]},
        "device_put (shard_batch)": lambda: jax.block_until_ready(shard_batch(batch, mesh)),
        "to_device (put + L1 on device)": lambda: jax.block_until_ready(to_device(batch, mesh)),
    }
    timings = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            timings[name].append(timed(args.batch_size, fn))
    seconds = {name: np.array([t.seconds for t in ts]) / args.batch_size
               for name, ts in timings.items()}
    seconds["L1 on device (to_device - put)"] = (seconds.pop("to_device (put + L1 on device)")
                                                 - seconds["device_put (shard_batch)"])
    read = seconds["read bytes (zstd decompress)"]
    print(f"\n2. Single-thread cost per image of each step (batches of {args.batch_size}, "
          f"{args.repeats} repetitions interleaved, {malloc_settings()})")
    print(f"  {'step':34s} {'ms/image [CPU]':>14s} {'x raw read':>10s}")
    shipped = {k: v for k, v in seconds.items() if "[prototype]" not in k}
    for name, value in [*seconds.items(), ("all steps (shipped)", sum(shipped.values()))]:
        print(f"  {name:34s} {1e3 * np.median(value):14.1f} {np.median(value / read):10.2f}")
    sys_share = np.median([t.system / t.cpu_seconds for t in timings[
        "read bytes (zstd decompress)"]])
    print(f"  system (kernel) share of the CPU time of reading the bytes: {sys_share:.2f}")
    reader = ArrayRecordReader(files[0])
    print(f"  ArrayRecord writer options of the files: {reader.writer_options_string()}")
    reader.close()


PARTS = ("measure", "diagnose", "allocator")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="/tmp/bench_input_pipeline",
                        help="TFDS data dir of the benchmark dataset (built if missing)")
    parser.add_argument("--images_per_set", type=int, default=5,
                        help="images of each of the 6 simulated pig sets (~62 MB each)")
    parser.add_argument("--experiment", default="semantic",
                        help="records the pipeline trains on ('' for the whole split)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4,
                        help="grain reader threads, and threads of the raw parallel read")
    parser.add_argument("--waves", type=int, default=2,
                        help="timed waves of --threads pipeline batches, after an untimed one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true",
                        help="print only the measured images/s as JSON (the allocator part)")
    parser.add_argument("--parts", default="measure", help=f"comma-separated, of {PARTS}")
    parser.add_argument("--clean", action="store_true", help="delete --data_dir at the end")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; known: {PARTS}")
    if args.waves < 1:
        parser.error("--waves must be positive")
    args.skip = args.threads  # one wave: every thread's first batch
    args.batches = args.skip + args.waves * args.threads

    print(f"input pipeline benchmark: jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"{load_average()}; {malloc_settings()}; parallel = {args.threads} threads")
    folder = build_dataset(Path(args.data_dir), args.images_per_set)
    files = split_files(folder)
    catalog = Catalog([f"{DATASET}:{SPLIT}"], args.data_dir)
    records = catalog.filter(experiment=args.experiment) if args.experiment else catalog.records
    cached = warm_page_cache(files)
    print(f"{DATASET}:{SPLIT}: {len(catalog)} records in {len(files)} files, "
          f"{cached / 1e9:.2f} GB on disk (read once to warm the page cache); the pipeline "
          f"samples {len(records)} records ({args.experiment or 'all'})")
    if "measure" in parts:
        results = measure(catalog, records, files, args)
        if args.json:
            print(json.dumps({name: _median_rate(t) for name, t in results.items()}))
            return
    if "diagnose" in parts:
        diagnose(catalog, records, files, args)
    if "allocator" in parts:
        allocator(args)
    print(f"\ndone; {load_average()}")
    if args.clean:
        shutil.rmtree(args.data_dir)
        print(f"deleted {args.data_dir}")


if __name__ == "__main__":
    main()
