"""Compatibility package: `from vit_jax.configs import models` as in the original code."""
