"""xeno_jax: xeno-learning for surgical spectral imaging in JAX."""

__version__ = "0.1.0"
