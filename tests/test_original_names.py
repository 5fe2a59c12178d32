"""Tests for the original `vit_jax.configs.models` function names (`get_b16_config()` & co.).

Scripts and tests written for the original call these names; they must return exactly the zoo's
configs, as fresh mutable copies, and be ordinary documented module-level functions.
"""

import inspect
import pydoc

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from vit_jax import models
from vit_jax.configs import models as models_config
from vit_jax.models_vit import VisionTransformer

# The original module's functions, by name, with the model each builds (LiT models left out: this
# package does not have them). Written out here, not derived from ORIGINAL_NAMES, so that the
# test is an independent record of the original's names.
ORIGINAL_FUNCTIONS = {
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


def test_mapping_is_the_original_list() -> None:
    assert models_config.ORIGINAL_NAMES == ORIGINAL_FUNCTIONS


def test_model_configs_holds_the_originals_models_only() -> None:
    # The original's models_test.py asserts a parameter count for every entry of this dict, so
    # the families added here (DeiT, Swin, BEiT) are in the zoo's dict and not in this one.
    assert list(models_config.MODEL_CONFIGS) == list(ORIGINAL_FUNCTIONS.values())
    for name, config in models_config.MODEL_CONFIGS.items():
        assert config is models.MODEL_CONFIGS[name]
    assert {"DeiT-S_16", "Swin-T_4_w7", "BEiT-B_16"} <= set(models.MODEL_CONFIGS)
    assert models_config.get_config("DeiT-S_16").model_name == "DeiT-S_16"


@pytest.mark.parametrize(("function_name", "zoo_name"), list(ORIGINAL_FUNCTIONS.items()))
def test_function_returns_the_zoo_config(function_name: str, zoo_name: str) -> None:
    config = getattr(models_config, function_name)()
    assert type(config) is ml_collections.ConfigDict  # mutable, as the original's
    assert config.to_dict() == models.get_config(zoo_name).to_dict()
    assert config.to_dict() == models.MODEL_CONFIGS[zoo_name].as_configdict().to_dict()
    assert config.model_name == zoo_name


@pytest.mark.parametrize("function_name", list(ORIGINAL_FUNCTIONS))
def test_function_returns_a_fresh_copy(function_name: str) -> None:
    """Mutating a result (top level and nested) touches neither the zoo nor the next call."""
    function = getattr(models_config, function_name)
    zoo_name = ORIGINAL_FUNCTIONS[function_name]
    before = models.MODEL_CONFIGS[zoo_name].as_configdict().to_dict()
    first = function()
    first.model_name = "changed"
    first.patches.size = (3, 3)
    first.extra_key = 1
    second = function()
    assert second is not first and second.patches is not first.patches
    assert second.to_dict() == before
    assert models.MODEL_CONFIGS[zoo_name].as_configdict().to_dict() == before
    assert models.get_config(zoo_name).to_dict() == before


def test_every_zoo_entry_has_a_function() -> None:
    named = list(ORIGINAL_FUNCTIONS.values())
    assert len(set(named)) == len(named)  # one function per model
    # DeiT is not in the original zoo, so no original function names it.
    assert set(named) == set(models.MODEL_CONFIGS) - set(models.NOT_IN_ORIGINAL)


@pytest.mark.parametrize(("function_name", "zoo_name"), list(ORIGINAL_FUNCTIONS.items()))
def test_functions_are_documented_module_level_functions(function_name: str, zoo_name: str) -> None:
    function = getattr(models_config, function_name)
    assert inspect.isfunction(function)
    assert function.__name__ == function.__qualname__ == function_name
    assert function.__module__ == "vit_jax.configs.models"
    assert not inspect.signature(function).parameters
    assert zoo_name in inspect.getdoc(function)
    assert function_name in dir(models_config)
    assert function_name in models_config.__all__
    assert f"{function_name}()" in pydoc.render_doc(function, renderer=pydoc.plaintext)


def test_from_import_and_star_import() -> None:
    from vit_jax.configs.models import get_b16_config

    assert get_b16_config is models_config.get_b16_config
    namespace: dict = {}
    exec("from vit_jax.configs.models import *", namespace)
    assert set(ORIGINAL_FUNCTIONS) | {"MODEL_CONFIGS", "get_config"} <= set(namespace)
    assert namespace["MODEL_CONFIGS"] is models_config.MODEL_CONFIGS


def test_module_help_lists_the_functions() -> None:
    text = pydoc.render_doc(models_config, renderer=pydoc.plaintext)
    for function_name in ORIGINAL_FUNCTIONS:
        assert function_name in text


def test_testing_config_inits_a_vision_transformer() -> None:
    """As the original's checkpoint_test: `VisionTransformer(num_classes=2, **config)`."""
    model = VisionTransformer(num_classes=2, **models_config.get_testing_config())
    variables = model.init(
        jax.random.PRNGKey(0), inputs=jnp.ones([1, 32, 32, 3], jnp.float32), train=False
    )
    assert variables["params"]["head"]["kernel"].shape == (10, 2)
    logits = model.apply(variables, jnp.ones([2, 32, 32, 3], jnp.float32), train=False)
    assert logits.shape == (2, 2)
