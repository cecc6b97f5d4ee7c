"""Consecutive slices of one uniform and one normal draw.

Every separate threefry call costs about 0.3 s of XLA compile time on a CPU, and a scene needs
dozens of small random inputs; drawing them in two calls keeps `generate` quick to compile
while keeping threefry (identical across CPU, GPU and TPU).
"""

from __future__ import annotations

import jax
import numpy as np


class Draws:
    """Hands out consecutive, non-overlapping slices of two draws made up front (trace time)."""

    def __init__(self, key, *, uniforms: int = 0, normals: int = 0):
        k_uniform, k_normal = jax.random.split(key)
        self._uniform = jax.random.uniform(k_uniform, (uniforms,))
        self._normal = jax.random.normal(k_normal, (normals,))
        self._used = {"uniform": 0, "normal": 0}

    def _take(self, kind: str, pool, shape) -> jax.Array:
        size = int(np.prod(shape))
        start = self._used[kind]
        if start + size > pool.shape[0]:
            raise ValueError(f"Draws: the {kind} pool of {pool.shape[0]} values is exhausted "
                             f"(need {start + size})")
        self._used[kind] = start + size
        return pool[start:start + size].reshape(shape)

    def uniform(self, shape=(), minval=0.0, maxval=1.0) -> jax.Array:
        return minval + (maxval - minval) * self._take("uniform", self._uniform, shape)

    def normal(self, shape=()) -> jax.Array:
        return self._take("normal", self._normal, shape)
