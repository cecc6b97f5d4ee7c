"""Benchmark of `xeno_jax.augment.project_spectra` against this machine's matmul rate.

The needed work of a projection is ``2 C^2`` flops per transformed pixel (one ``x W`` product);
this prints images per second (p=1) and the rate achieved on that work as a fraction of the float32
matrix-multiply rate measured in the same run (a large square `jnp.dot`). Label maps are random
Voronoi partitions of every image into the 12 classes, so each label covers about 1/12 of an image.

    python experiments/benchmarks/augment.py                    # 8 x 480 x 640 x 100, ~1 minute
    python experiments/benchmarks/augment.py --repeats=10 --batch=16
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from xeno_jax.augment import project_spectra
from xeno_jax.labels import ICG_LABELS, SPECIES_12
from xeno_jax.projections import ProjectionBank


def voronoi_labels(rng: np.random.Generator, batch: int, height: int, width: int,
                   num_classes: int = 12) -> np.ndarray:
    """``(batch, height, width)`` int32 maps: one Voronoi cell per class, in random places."""
    rows, cols = np.mgrid[0:height, 0:width]
    maps = np.empty((batch, height, width), np.int32)
    for b in range(batch):
        seeds = rng.uniform((0, 0), (height, width), (num_classes, 2))
        nearest = np.full((height, width), np.inf)
        for label, (y, x) in enumerate(seeds):
            distance = (rows - y) ** 2 + (cols - x) ** 2
            maps[b][distance < nearest] = label
            nearest = np.minimum(nearest, distance)
    return maps


def near_identity_bank(rng: np.random.Generator, labels, pairs: int, channels: int
                       ) -> ProjectionBank:
    """`pairs` random maps near the identity per label (the cost does not depend on the values)."""
    return ProjectionBank.from_pairs({
        label: (np.eye(channels) + 0.01 * rng.standard_normal((pairs, channels, channels)),
                1e-4 * rng.standard_normal((pairs, channels)))
        for label in labels})


def matmul_rate(size: int, repeats: int) -> float:
    """float32 flops per second of a jitted ``(size, size) @ (size, size)`` product."""
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    product = jax.jit(jnp.dot)
    product(a, a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def projection_rate(features, labels, bank, target_labels, repeats: int, tile_size: int):
    """Best seconds of one `project_spectra` call (p=1, interpolation), transformed pixels.

    With p=1 every image is selected, so every call does the same work: the pixels whose label
    is a target label. The best of `repeats` calls is taken (the machine may be shared).
    """
    project = jax.jit(functools.partial(project_spectra, label_mode="label_match",
                                        target_labels=target_labels, interpolate=True, p=1.0,
                                        tile_size=tile_size), donate_argnums=1)
    features = project(jax.random.key(0), features, labels, bank)  # compiles
    features.block_until_ready()
    best = np.inf
    for r in range(repeats):
        start = time.perf_counter()
        features = project(jax.random.key(r + 1), features, labels, bank)  # donated: in place
        features.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best, int(np.isin(np.asarray(labels), target_labels).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=64, help="pairs per label in the bank")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many calls")
    parser.add_argument("--tile-size", type=int, default=2048)
    parser.add_argument("--matmul-size", type=int, default=4096)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    channels = args.channels
    labels = jnp.asarray(voronoi_labels(rng, args.batch, args.height, args.width))
    features = jax.random.uniform(jax.random.key(0),
                                  (args.batch, args.height, args.width, channels)) / channels
    bank = jax.device_put(near_identity_bank(rng, range(12), args.pairs, channels))

    print(f"devices: {jax.devices()}; batch {args.batch} x {args.height} x {args.width} x "
          f"{channels}, {args.pairs} pairs per label, tile {args.tile_size} pixels")
    rate = matmul_rate(args.matmul_size, args.repeats)
    cases = {"1 target label (kidney)": (SPECIES_12.name_to_index("kidney"),),
             "8 target labels (ICG)": tuple(sorted(SPECIES_12.name_to_index(n)
                                                   for n in ICG_LABELS))}
    results = {}
    for name, target_labels in cases.items():
        results[name] = projection_rate(features, labels, bank, target_labels, args.repeats,
                                        args.tile_size)
        features = jax.random.uniform(jax.random.key(0), features.shape) / channels
    rate = max(rate, matmul_rate(args.matmul_size, args.repeats))  # before and after
    print(f"float32 matmul rate ({args.matmul_size}^3 jnp.dot, best of {2 * args.repeats} "
          f"before and after): {rate / 1e9:.1f} GFLOP/s")
    for name, (seconds, pixels) in results.items():
        achieved = 2 * channels**2 * pixels / seconds
        print(f"{name}: {seconds * 1e3:.1f} ms per batch (best of {args.repeats}), "
              f"{args.batch / seconds:.1f} images/s, {pixels} transformed pixels, "
              f"{achieved / 1e9:.1f} GFLOP/s on the needed work = {achieved / rate:.0%} of the "
              "matmul rate")


if __name__ == "__main__":
    main()
