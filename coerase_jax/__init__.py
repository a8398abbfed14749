"""coerase-jax: Co-Erasing (text-image collaborative concept erasure) for Stable Diffusion 1.x in JAX."""

__version__ = "0.1.0"
