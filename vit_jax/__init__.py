"""vit_jax: Vision Transformer and MLP-Mixer in JAX/Flax, reading the released checkpoints."""

__version__ = "0.1.0"
