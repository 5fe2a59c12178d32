"""Bad configs a new user writes, each refused before any work with its own words.

The cases of a review run as a new user would: a model name that disagrees with the model's
fields, a negative class count, a NaN learning rate, a workdir that is a file, and attention
dropout that the fused attention cannot apply because the config left the key to its default.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import common, finetune
from configs import default as default_config
from vit_jax import models, models_vit, run_config


def _finetune_phase() -> ml_collections.ConfigDict:
    return default_config.get_config().finetune


def test_a_model_name_that_disagrees_with_the_fields_is_an_error():
    config = _finetune_phase()  # the tiny model, named 'testing'
    run_config.validate_config(config, 8, 8)
    config.model.model_name = "ViT-B_16"  # --config.finetune.model.model_name=ViT-B_16
    with pytest.raises(ValueError) as error:
        run_config.validate_config(config, 8, 8)
    message = str(error.value)
    assert "model_name='ViT-B_16', but the model's fields are not ViT-B_16's" in message
    assert "hidden_size 64 (ViT-B_16: 768)" in message
    assert "transformer.num_layers 2 (ViT-B_16: 12)" in message
    assert "--config=configs/finetune.py:ViT-B_16,<dataset>" in message


def test_zoo_models_with_recipe_options_pass_the_name_check():
    for name in ("ViT-B_16", "R50+ViT-B_16", "Mixer-B_16"):
        models.check_model_config(finetune.get_config(f"{name},cifar10").model)
    # Options that do not change the architecture may differ from the zoo.
    models.check_model_config(
        common.model_config("ViT-L_16", transformer={"dropout_rate": 0.0}, representation_size=8)
    )
    with pytest.raises(ValueError, match=r"classifier gap \(ViT-B_16: token\)"):
        models.check_model_config(common.model_config("ViT-B_16", classifier="gap"))


@pytest.mark.parametrize("num_classes", [-1, 2.5, True])
def test_a_bad_class_count_is_an_error_naming_it(num_classes):
    expected = f"num_classes must be a positive integer.*got {num_classes!r}"
    with pytest.raises(ValueError, match=expected):
        models.get_model("testing", num_classes=num_classes)
    model = models.VisionTransformer(**{**models.get_config("testing"), "num_classes": -1})
    with pytest.raises(ValueError, match="got -1"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
def test_a_learning_rate_that_is_not_finite_and_positive_is_an_error(value):
    config = _finetune_phase()
    config.base_lr = value
    with pytest.raises(ValueError, match=f"base_lr must be ≥ 0 and finite .*got {value}"):
        run_config.validate_config(config, 8, 8)


def test_a_workdir_that_is_a_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    for workdir in (path, path / "run"):
        with pytest.raises(ValueError, match=f"workdir '{workdir}' cannot be a directory"):
            run_config.make_workdir(str(workdir))
    assert path.read_text() == "not a directory"  # nothing lost


def test_a_read_only_workdir_is_an_error_naming_it(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode)
    )  # tests run as root, who may write anywhere: the check itself is what is tested
    with pytest.raises(ValueError, match=f"workdir '{tmp_path}' is not writable"):
        run_config.make_workdir(str(tmp_path))


def test_attention_dropout_has_one_default_that_validation_sees():
    config = _finetune_phase()
    del config.model.transformer["attention_dropout_rate"]  # a hand-built config without it
    config.attention_impl = "xla"
    default = models_vit.TRANSFORMER_DEFAULTS["attention_dropout_rate"]
    assert default == 0.1  # the original Encoder's default, which the model applies
    with pytest.raises(ValueError, match=r"attention_dropout_rate=0.1; set it to 0"):
        run_config.validate_config(config, 8, 8)
    config.model.transformer.attention_dropout_rate = 0.0
    run_config.validate_config(config, 8, 8)


def test_recipe_options_reach_the_model_and_are_checked():
    config = _finetune_phase()
    config.update(drop_path_rate=0.1, head_hidden_size=16)
    run_config.validate_config(config, 8, 8)
    model = run_config.make_model(config, num_classes=10)
    assert (model.drop_path_rate, model.head_hidden_size) == (0.1, 16)
    mixer = finetune.get_config("Mixer-B_16,cifar10")
    mixer.head_hidden_size = 16  # the shared head: Mixer has it too
    run_config.validate_config(mixer, 8, 8)
    assert run_config.make_model(mixer, num_classes=10).head_hidden_size == 16
    mixer.drop_path_rate = 0.1
    taken = r"a mixer model\) takes compute_dtype, head_hidden_size only; unset drop_path_rate"
    with pytest.raises(ValueError, match=taken):
        run_config.validate_config(mixer, 8, 8)
    config.drop_path_rate = 1.0
    with pytest.raises(ValueError, match="drop_path_rate"):
        run_config.validate_config(config, 8, 8)
    config.drop_path_rate, config.head_hidden_size = 0.0, -3
    with pytest.raises(ValueError, match="head_hidden_size"):
        run_config.validate_config(config, 8, 8)


def test_a_distilled_model_is_refused_by_plain_classification():
    config = finetune.get_config("DeiT-S_16-dist,cifar10")
    with pytest.raises(ValueError, match=r"DeiT-S_16-dist has a distillation token.*DeiT-S_16\)"):
        run_config.validate_config(config, 8, 8)
    run_config.validate_config(finetune.get_config("DeiT-S_16,cifar10"), 8, 8)
