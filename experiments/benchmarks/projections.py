"""Benchmark of `xeno_jax.projections.fit_projections` against a pixel-level fit.

Fits all (source, target) pairs of synthetic 30,000-pixel, 100-channel L1 spectra with the
statistics-based, pair-vmapped fit, and a few of the same pairs with the plain pixel-level
formulation (``Y = X W + b`` over all pixels, jitted, the same 100 Adam steps), and prints pairs
per second of both, their ratio, and the time for all 60 x 120 pairs of a paper-sized kidney set
(extrapolated from the measured rates, or measured with ``--kidney``).

    python experiments/benchmarks/projections.py                 # ~1 minute
    python experiments/benchmarks/projections.py --kidney        # also fits all 7,200 pairs
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xeno_jax.projections import fit_projections, spectra_statistics


def synthetic_images(rng: np.random.Generator, count: int, pixels: int, channels: int,
                     shift: float) -> list[np.ndarray]:
    """L1-normalised float32 spectra: a per-image base shape, brightness variation, noise."""
    images = []
    for _ in range(count):
        base = rng.uniform(0.5, 1.5, channels) + shift
        x = base * rng.lognormal(0, 0.2, (pixels, 1)) + rng.normal(0, 0.05, (pixels, channels))
        images.append((x / np.abs(x).sum(1, keepdims=True)).astype(np.float32))
    return images


@jax.jit
def pixel_level_fit(source, target):
    """One pair on its pixels: the reference formulation, 100 Adam steps from (I, 0)."""
    channels = source.shape[1]
    target_mean, target_std = target.mean(0), target.std(0, ddof=1)

    def loss_fn(params):
        y = source @ params["W"] + params["b"]
        return (jnp.mean((y.mean(0) - target_mean) ** 2)
                + jnp.mean((y.std(0, ddof=1) - target_std) ** 2))

    optimizer = optax.adam(0.01)

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return (optax.apply_updates(params, updates), state), loss

    params = {"W": jnp.eye(channels), "b": jnp.zeros(channels)}
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), length=100)
    return params["W"], params["b"], losses[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--pixels", type=int, default=30_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--pixel-pairs", type=int, default=3,
                        help="pairs timed with the pixel-level fit")
    parser.add_argument("--chunk-size", type=int, default=64, help="pairs fitted together")
    parser.add_argument("--kidney", action="store_true",
                        help="measure all 60 x 120 pairs instead of extrapolating")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    source = synthetic_images(rng, args.sources, args.pixels, args.channels, 0.0)
    target = synthetic_images(rng, args.targets, args.pixels, args.channels, 0.3)
    num_pairs = args.sources * args.targets
    print(f"devices: {jax.devices()}; {args.sources} x {args.targets} = {num_pairs} pairs of "
          f"{args.pixels}-pixel, {args.channels}-channel images")

    def fit(src, tgt):
        weights, _, _ = fit_projections(src, tgt, chunk_size=args.chunk_size)
        weights.block_until_ready()

    def statistics_seconds(images, covariance):
        spectra_statistics(images[0], covariance=covariance).mean.block_until_ready()  # compile
        start = time.perf_counter()
        for image in images[:4]:
            spectra_statistics(image, covariance=covariance).mean.block_until_ready()
        return (time.perf_counter() - start) / len(images[:4])

    fit(source[:1], target[:1])  # compile
    source_seconds = statistics_seconds(source, True)
    target_seconds = statistics_seconds(target, False)
    start = time.perf_counter()
    fit(source, target)
    fit_seconds = time.perf_counter() - start
    ours = num_pairs / fit_seconds
    pair_seconds = (fit_seconds - args.sources * source_seconds
                    - args.targets * target_seconds) / num_pairs
    print(f"fit_projections: {fit_seconds:.2f} s for {num_pairs} pairs = {ours:.1f} pairs/s, "
          f"statistics included ({source_seconds * 1e3:.1f} ms per source image, "
          f"{target_seconds * 1e3:.1f} ms per target image, {pair_seconds * 1e3:.2f} ms per "
          "pair fit)")

    pixel_level_fit(source[0], target[0])[0].block_until_ready()  # compile
    start = time.perf_counter()
    for k in range(args.pixel_pairs):
        pixel_level_fit(source[k % args.sources], target[k % args.targets])[0].block_until_ready()
    pixel = args.pixel_pairs / (time.perf_counter() - start)
    print(f"pixel-level fit: {pixel:.3f} pairs/s ({args.pixel_pairs} pairs timed)")
    print(f"speed-up: {ours / pixel:.0f}x")

    kidney_pairs = 60 * 120
    if args.kidney:
        kidney_source = synthetic_images(rng, 60, args.pixels, args.channels, 0.0)
        kidney_target = synthetic_images(rng, 120, args.pixels, args.channels, 0.3)
        start = time.perf_counter()
        fit(kidney_source, kidney_target)
        print(f"kidney set, 60 x 120 = {kidney_pairs} pairs: {time.perf_counter() - start:.1f} s "
              "(measured)")
    else:
        estimate = 60 * source_seconds + 120 * target_seconds + kidney_pairs * pair_seconds
        print(f"kidney set, 60 x 120 = {kidney_pairs} pairs: {estimate:.1f} s (extrapolated from "
              "the measured statistics and per-pair times); pixel-level: "
              f"{kidney_pairs / pixel / 3600:.1f} h (extrapolated)")


if __name__ == "__main__":
    main()
