"""Re-exports the model zoo for scripts written against the original `vit_jax.configs.models`."""

from vit_jax.models import MODEL_CONFIGS, get_config  # noqa: F401
