"""easgd_jax: parallel training algorithms side by side in JAX (README.md)."""
