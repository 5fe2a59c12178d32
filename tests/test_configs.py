"""Tests for configs/common.py: run configs get checked model sections from the zoo."""

import pytest

from configs import common
from vit_jax import models


@pytest.mark.parametrize("name", list(models.MODEL_CONFIGS))
def test_model_config_builds_every_zoo_model(name):
    config = common.model_config(name, num_classes=10)
    assert config.num_classes == 10 and config.model_name == name
    model = models.model_class(name)(**config)
    assert model.num_classes == 10


def test_model_config_overrides_nested_keys_only():
    config = common.model_config("ViT-L_16", num_classes=3, transformer={"dropout_rate": 0.0})
    assert config.transformer.dropout_rate == 0.0
    assert config.transformer.num_layers == 24  # untouched
    assert models.MODEL_CONFIGS["ViT-L_16"].transformer.dropout_rate == 0.1  # zoo unchanged


def test_model_config_rejects_unknown_names_and_keys():
    with pytest.raises(ValueError, match="Did you mean: ViT-B_16"):
        common.model_config("ViT-B16")
    with pytest.raises(ValueError, match=r"no option\(s\) \['hidden'\].*hidden_size"):
        common.model_config("ViT-B_16", hidden=3)
