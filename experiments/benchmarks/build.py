"""Benchmark of the real-data (``tivita``) build against the raw read speed of the same files.

Writes (once, reused if present) a dataset of ``--images`` full-size images (480 x 640 x 100
``.dat`` cubes of 123 MB and their annotations, the reference layout, ~1 GB for 8) and
measures, in one run, repetitions interleaved, page cache warm (every file is read once first):

- raw: reading the bytes of every cube and annotation file (``Path.read_bytes``), one thread;
- read: `xeno_jax.io.tivita.read_cube` (parsing and orientation) of every cube, one thread;
- build: the whole ``tivita`` build (planning, reading, the validity checks, float16
  conversion, TFDS's ArrayRecord writing and its shuffle), into a fresh data directory;

and prints images per second of each (wall time) and its CPU seconds per image (this process's
CPU time: on a machine shared with others the steadier figure), the ratios build / raw and
read / raw of both, and the disk used per 1,000 images by the source files and the built
dataset.

    python experiments/benchmarks/build.py                    # ~2 min (+1 min to write data)
    python experiments/benchmarks/build.py --images=16 --repeats=3 --root=/tmp/tivita_bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

import data_builders
from xeno_jax.io import tivita

LABELS = {"background": 0, "stomach": 1, "small_bowel": 2, "colon": 3, "liver": 4, "kidney": 6,
          "spleen": 7, "unlabeled": 255}


def write_data(root: Path, count: int) -> None:
    """``count`` camera-size images of 4 subjects in the reference layout (skipped if there)."""
    if len(tivita.discover_images(root) if (root / "data" / "subjects").is_dir() else []) == count:
        return
    shutil.rmtree(root, ignore_errors=True)
    tivita.write_dataset_settings(root, {"dataset_name": "bench", "label_mapping": LABELS,
                                         "last_valid_label_index": 7,
                                         "annotation_name_default": "semantic#primary"})
    rng = np.random.default_rng(0)
    for i in range(count):
        cube = rng.uniform(0.01, 1.0, (480, 640, 100)).astype(np.float32)
        mask = np.repeat(np.array(list(LABELS.values()), np.uint8), 80)[None, :640]
        mask = np.broadcast_to(np.roll(mask, 37 * i, axis=1), (480, 640))
        tivita.write_image(root, f"P{i % 4:03d}", f"2099_01_01_10_{i // 60:02d}_{i % 60:02d}",
                           cube, {"semantic#primary": mask})


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "xeno_tivita_bench"))
    args = parser.parse_args()
    root = Path(args.root) / "dataset"
    write_data(root, args.images)
    images = tivita.discover_images(root)
    files = [p for image in images for p in (image.cube_path, image.annotation_path)]
    for path in files:  # warm the page cache
        path.read_bytes()

    def raw():
        for path in files:
            path.read_bytes()

    def read():
        for image in images:
            tivita.read_cube(image.cube_path)

    built = Path(args.root) / "tfds"

    def build():
        shutil.rmtree(built, ignore_errors=True)
        builder = data_builders.builder("pig", "tivita", data_dir=str(built))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(root)))

    times: dict[str, list[float]] = {"raw": [], "read": [], "build": []}
    cpu: dict[str, list[float]] = {"raw": [], "read": [], "build": []}
    for _ in range(args.repeats):
        for name, fn in (("raw", raw), ("read", read), ("build", build)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    n = len(images)
    rate = {k: n / np.median(v) for k, v in times.items()}
    cpu_per_image = {k: np.median(v) / n for k, v in cpu.items()}
    print(f"load average {os.getloadavg()}, {n} images of 480 x 640 x 100, "
          f"{args.repeats} repetitions (median; [min, max] images/s)")
    for name, label in (("raw", "raw bytes of the same files"), ("read", "read_cube"),
                        ("build", "tivita build")):
        spread = [n / t for t in (max(times[name]), min(times[name]))]
        print(f"  {label:28s} {rate[name]:6.2f} images/s [CPU]  "
              f"[{spread[0]:.2f}, {spread[1]:.2f}]   {cpu_per_image[name]:.3f} CPU s/image")
    print(f"  build / raw read: {rate['build'] / rate['raw']:.3f} (wall), "
          f"{cpu_per_image['raw'] / cpu_per_image['build']:.3f} (CPU); "
          f"read_cube / raw read: {rate['read'] / rate['raw']:.3f} (wall), "
          f"{cpu_per_image['raw'] / cpu_per_image['read']:.3f} (CPU)")
    per_1000 = 1000 / len(images) / 1e9
    print(f"  disk per 1,000 images: source {disk_bytes(root) * per_1000:.1f} GB, "
          f"built dataset {disk_bytes(built) * per_1000:.1f} GB")


if __name__ == "__main__":
    main()
