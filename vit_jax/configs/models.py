"""The model zoo under the original `vit_jax.configs.models` names.

Scripts written for the original call `models_config.get_b16_config()` and read
`models_config.MODEL_CONFIGS`; both work here. `MODEL_CONFIGS` here holds the original's models
only, as the original's module does (its models_test.py checks a parameter count for each entry);
the families this package adds (DeiT, Swin, BEiT) are in `vit_jax.models.MODEL_CONFIGS`, and
`get_config` takes any zoo name. The sizes live only in `vit_jax.models` (one table per family):
every `get_*_config` below is generated from `ORIGINAL_NAMES` and returns
`vit_jax.models.get_config(zoo_name)`, a fresh mutable copy, exactly as the original's functions
built a new ConfigDict on every call. They are ordinary module-level functions (in `dir()`,
`help()` and `__all__`), so `from vit_jax.configs.models import get_b16_config` works too.
"""

from collections.abc import Callable

import ml_collections

from vit_jax import models
from vit_jax.models import get_config

# Original function name -> zoo name, in the order of the original module (LiT models, which this
# package does not have, are left out).
ORIGINAL_NAMES: dict[str, str] = {
    "get_testing_config": "testing",
    "get_testing_unpooled_config": "testing-unpooled",
    "get_ti16_config": "ViT-Ti_16",
    "get_s16_config": "ViT-S_16",
    "get_b16_config": "ViT-B_16",
    "get_l16_config": "ViT-L_16",
    "get_h14_config": "ViT-H_14",
    "get_s16_gap_norep_config": "ViT-S_16-gap-norep",
    "get_b16_gap_norep_config": "ViT-B_16-gap-norep",
    "get_b8_config": "ViT-B_8",
    "get_s32_config": "ViT-S_32",
    "get_b32_config": "ViT-B_32",
    "get_l32_config": "ViT-L_32",
    "get_s32_gap_norep_config": "ViT-S_32-gap-norep",
    "get_b32_gap_norep_config": "ViT-B_32-gap-norep",
    "get_r_ti16_config": "R+ViT-Ti_16",
    "get_r50_b16_config": "R50+ViT-B_16",
    "get_r26_b32_config": "R26+ViT-B_32",
    "get_r26_s32_config": "R26+ViT-S_32",
    "get_r50_l32_config": "R50+ViT-L_32",
    "get_mixer_b16_config": "Mixer-B_16",
    "get_mixer_b32_config": "Mixer-B_32",
    "get_mixer_l16_config": "Mixer-L_16",
}
# The zoo's entries of the original's models, in the order above (the same frozen configs).
MODEL_CONFIGS = {zoo: models.MODEL_CONFIGS[zoo] for zoo in ORIGINAL_NAMES.values()}


def _make_getter(function_name: str, zoo_name: str) -> Callable[[], ml_collections.ConfigDict]:
    """A named, documented function returning a fresh copy of zoo entry `zoo_name`.

    A closure per name (rather than `functools.partial`) so that each is a real function with its
    own `__name__`, `__qualname__` and docstring, as `help()`, `inspect` and tracebacks expect.
    """

    def getter() -> ml_collections.ConfigDict:
        return get_config(zoo_name)

    getter.__name__ = getter.__qualname__ = function_name
    getter.__module__ = __name__
    getter.__doc__ = (
        f"Returns the {zoo_name} configuration, as the original `{function_name}()`.\n\n"
        f"A fresh mutable copy of `vit_jax.models.MODEL_CONFIGS[{zoo_name!r}]`:\n"
        "changing it changes neither the zoo nor the next call's result.\n"
    )
    return getter


globals().update({fn: _make_getter(fn, zoo) for fn, zoo in ORIGINAL_NAMES.items()})

__all__ = ["MODEL_CONFIGS", "ORIGINAL_NAMES", "get_config", *ORIGINAL_NAMES]
