"""Per-pixel L1 normalisation of spectra (the reference preprocessing)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def l1_normalize(x, axis: int = -1):
    """Returns ``x / sum(|x|)`` along `axis`; an all-zero spectrum stays zero (never NaN).

    NumPy input gives NumPy output, anything else goes through `jax.numpy` (jittable).
    """
    xp = np if isinstance(x, np.ndarray | np.generic) else jnp
    norm = xp.sum(xp.abs(x), axis=axis, keepdims=True)
    nonzero = norm > 0
    return xp.where(nonzero, x / xp.where(nonzero, norm, 1), 0).astype(x.dtype)
