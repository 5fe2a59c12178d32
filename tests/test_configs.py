"""Tests for the run configs: common's model sections, default, pretrain and finetune recipes.

Every config is built with its documented arguments and must pass `train.validate_config` on 8
devices; the recipe numbers are those of REFERENCE §6.
"""

import math

import pytest

from configs import common, finetune, pretrain
from configs import default as default_config
from vit_jax import models, train

POOLING = ("token", "gap")  # classifiers a recipe can train (unpooled models return tokens)


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


# ----------------------------------------------------------------------------------------------
# Run configs: default, pretrain and finetune recipes (REFERENCE §6).

POOLED = [n for n, c in models.MODEL_CONFIGS.items() if c.get("classifier", "gap") in POOLING]
FINETUNE_DATASETS = [*(d for d in finetune.PRESETS if d != finetune.FOLDER), "folder:/data/x"]
# dataset: (train split, test split, total steps, warmup steps), as in REFERENCE §6.
RECIPE_STEPS = {
    "cifar10": ("train[:98%]", "test", 10_000, 500),
    "cifar100": ("train[:98%]", "test", 10_000, 500),
    "imagenet2012": ("train[:99%]", "validation", 20_000, 500),
    "oxford_iiit_pet": ("train[:90%]", "test", 500, 100),
    "oxford_flowers102": ("train[:90%]", "test", 500, 100),
    "folder:/data/x": ("train", "test", 500, 100),
}


def test_default_config_phases_validate_and_keep_their_values():
    config = default_config.get_config()
    assert config.phases == ("pretrain", "finetune")
    for name in config.phases:
        train.validate_config(config[name], 8, 8)
        assert config[name].dataset == "sklearn_digits" and config[name].batch_size == 128
        assert config[name].model.to_dict() == config.pretrain.model.to_dict()
    pre, fine = config.pretrain, config.finetune
    assert (pre.image_size, pre.optimizer, pre.base_lr) == (16, "adamw", 3e-3)
    assert pre.weight_decay == 0.03
    assert (pre.total_steps, pre.warmup_steps, pre.decay_type) == (4000, 100, "linear")
    assert (pre.linear_end, pre.log_every, pre.pretrained) == (1e-5, 1000, "")
    assert (fine.image_size, fine.optimizer, fine.base_lr, fine.momentum) == (32, "sgd", 0.1, 0.9)
    assert (fine.total_steps, fine.warmup_steps, fine.decay_type) == (400, 40, "cosine")
    assert (fine.log_every, fine.pretrained) == (100, "phase:pretrain")
    assert (pre.model.hidden_size, pre.model.patches.size) == (64, (4, 4))


@pytest.mark.parametrize("name", POOLED)
def test_pretrain_recipe_builds_and_validates_for_every_model(name):
    config = pretrain.get_config(name)
    train.validate_config(config, 8, 8)  # 224 px tiles into every model's patches
    assert config.model.model_name == name
    assert (config.image_size, config.batch_size) == (224, 4096)
    assert (config.optimizer, config.adam_b1, config.adam_b2) == ("adamw", 0.9, 0.999)
    assert (config.base_lr, config.warmup_steps) == (1e-3, 10_000)
    assert (config.decay_type, config.linear_end) == ("linear", 1e-5)
    assert (config.weight_decay, config.grad_clip_norm, config.loss) == (0.03, 1.0, "sigmoid_xent")
    # 90 epochs of the 14,145,922 ImageNet-21k training images at 4096 per step.
    assert config.total_steps == 310_824 == math.ceil(90 * (14_197_122 - 51_200) / 4096)
    assert config.dataset.startswith("folder:")
    assert (config.train_split, config.test_split) == ("train", "test")
    if "transformer" in config.model:  # ViT and hybrids; Mixer has none of these options
        assert config.model.transformer.dropout_rate == 0.1
        assert config.model.representation_size == config.model.hidden_size
        assert config.model.head_bias_init == -10.0


def test_pretrain_defaults_to_vit_b16_and_its_model_gets_the_recipe_options():
    assert pretrain.get_config().model.model_name == "ViT-B_16"
    model = train.make_model(pretrain.get_config("ViT-B_16"), num_classes=21_843)
    assert (model.head_bias_init, model.representation_size) == (-10.0, 768)
    assert model.transformer["dropout_rate"] == 0.1  # the trained bias: tests/test_e2e.py


@pytest.mark.parametrize("dataset", FINETUNE_DATASETS)
@pytest.mark.parametrize("name", ["ViT-B_16", "R50+ViT-B_16", "Mixer-B_16", "ViT-L_16"])
def test_finetune_recipe_for_every_preset(name, dataset):
    config = finetune.get_config(f"{name},{dataset}")
    train.validate_config(config, 8, 8)
    assert (config.dataset, config.model.model_name) == (dataset, name)
    train_split, test_split, steps, warmup = RECIPE_STEPS[dataset]
    assert (config.train_split, config.test_split) == (train_split, test_split)
    assert (config.total_steps, config.warmup_steps) == (steps, warmup)
    assert (config.image_size, config.batch_size) == (384, 512)
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 0.0)
    assert (config.grad_clip_norm, config.decay_type, config.linear_end) == (1.0, "cosine", 0.0)
    assert (config.loss, config.optim_dtype, config.pretrained) == ("softmax_xent", "bfloat16", "")
    expected_lr = 0.01 if (name, dataset) == ("ViT-B_16", "cifar10") else 0.03
    assert config.base_lr == expected_lr


@pytest.mark.parametrize("name", POOLED)
def test_finetune_image_size_tiles_for_every_model(name):
    config = finetune.get_config(f"{name},imagenet2012")
    train.validate_config(config, 8, 8)
    assert config.image_size == (392 if name == "ViT-H_14" else 384)  # 28 × 14 ≥ 384


@pytest.mark.parametrize(
    ("name", "dropout"),
    [
        ("ViT-B_16", 0.0),
        ("R50+ViT-B_16", 0.0),  # zoo 0.1
        ("testing", 0.0),  # zoo 0.1
        ("ViT-L_16", 0.1),  # L/H keep the zoo value
        ("ViT-L_32", 0.0),
        ("R50+ViT-L_32", 0.1),
        ("ViT-H_14", 0.1),
    ],
)
def test_finetune_dropout_is_zero_except_for_large_and_huge_models(name, dropout):
    model = finetune.get_config(f"{name},cifar100").model
    assert model.transformer.dropout_rate == dropout
    assert model.representation_size is None  # fine-tuned models have no pre_logits layer


def test_finetune_arguments_are_parsed_and_checked():
    assert finetune.get_config().dataset == "cifar10"  # default 'ViT-B_16,cifar10'
    assert finetune.get_config(" ViT-S_16 , folder:/a,b ").dataset == "folder:/a,b"
    with pytest.raises(ValueError, match="Did you mean: ViT-B_16"):
        finetune.get_config("ViT-B16,cifar10")
    valid = "cifar10, cifar100, imagenet2012, oxford_iiit_pet, oxford_flowers102, folder:/path"
    with pytest.raises(ValueError, match=f"'svhn'; valid: {valid}"):
        finetune.get_config("ViT-B_16,svhn")
    with pytest.raises(ValueError, match="'folder:'; valid"):
        finetune.get_config("ViT-B_16,folder:")
    with pytest.raises(ValueError, match="takes '<model>,<dataset>'"):
        finetune.get_config("ViT-B_16")
    with pytest.raises(ValueError, match="Did you mean: ViT-L_16"):
        pretrain.get_config("ViT-L16")


@pytest.mark.parametrize(
    "make", [default_config.get_config, pretrain.get_config, finetune.get_config], ids=str
)
def test_run_configs_are_locked(make):
    config = make()
    target = config.finetune if "phases" in config else config
    with pytest.raises(AttributeError, match="batchsize"):
        target.batchsize = 3
