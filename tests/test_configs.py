"""Tests for the run configs: common's model sections, default, pretrain and finetune recipes.

Every config is built with its documented arguments and must pass
`run_config.validate_config` on 8 devices; the recipe numbers are those of the ViT paper and
the original vit_jax configs.
"""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, finetune, pretrain
from configs import default as default_config
from tests import _compiled
from vit_jax import checkpoint, models, predict, run_config, train

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
# Run configs: default, pretrain and finetune recipes (the ViT paper, the original's configs).

# Models the classification recipes train: pooled, and without a distillation token (a
# distilled model's second head needs a teacher; the classification task refuses it).
POOLED = [
    n
    for n, c in models.MODEL_CONFIGS.items()
    if c.get("classifier", "gap") in POOLING
    and not c.get("distilled")
    and models.family(n) in ("vit", "mixer")  # the pretraining recipe is for these families
]
# Swin and BEiT are fine-tuned (their authors' recipes), not pretrained, by the recipes here.
RELATIVE = [n for n in models.MODEL_CONFIGS if models.family(n) in ("swin", "beit")]
FINETUNE_DATASETS = [
    *(d for d in finetune.PRESETS if d not in common.PATH_PREFIXES),
    "folder:/data/x",
    "records:/data/x",
]
# dataset: (train split, test split, total steps, warmup steps), as in the original's configs.
RECIPE_STEPS = {
    "cifar10": ("train[:98%]", "test", 10_000, 500),
    "cifar100": ("train[:98%]", "test", 10_000, 500),
    "imagenet2012": ("train[:99%]", "validation", 20_000, 500),
    "oxford_iiit_pet": ("train[:90%]", "test", 500, 100),
    "oxford_flowers102": ("train[:90%]", "test", 500, 100),
    "folder:/data/x": ("train", "test", 500, 100),
    "records:/data/x": ("train", "test", 500, 100),
}


def test_default_config_phases_validate_and_fine_tuning_starts_from_pretraining(tmp_path):
    config = default_config.get_config()
    phases = run_config.resolve_phases(config, str(tmp_path))  # validates every phase
    assert list(phases) == ["pretrain", "finetune"]
    pre, fine = phases["pretrain"], phases["finetune"]
    assert (pre.pretrained, fine.pretrained) == ("", str(tmp_path / "pretrain"))
    assert fine.model.to_dict() == pre.model.to_dict()  # same model, new resolution
    # The fine-tuning grid is 2× the pretraining one in each direction: the position table is
    # resampled (4×4 → 8×8 patches of 4 px), as fine-tuning a released model at 384 px does.
    grid = [c.image_size // c.model.patches.size[0] for c in (pre, fine)]
    assert grid == [4, 8]


def test_a_bad_later_phase_fails_before_the_first_phase_trains(tmp_path):
    config = default_config.get_config()
    config.finetune.base_lr = float("nan")
    with pytest.raises(ValueError, match=r"Phase 'finetune' .*base_lr must be ≥ 0 and finite"):
        train.train_phases(config, str(tmp_path))
    assert not (tmp_path / "pretrain").exists()  # nothing ran


@pytest.mark.parametrize("name", POOLED)
def test_pretrain_recipe_builds_and_validates_for_every_model(name):
    config = pretrain.get_config(name)
    run_config.validate_config(config, 8, 8)  # 224 px tiles into every model's patches
    assert config.model.model_name == name
    assert (config.image_size, config.batch_size) == (224, 4096)
    assert (config.optimizer, config.adam_b1, config.adam_b2) == ("adamw", 0.9, 0.999)
    assert (config.base_lr, config.warmup_steps) == (1e-3, 10_000)
    assert (config.decay_type, config.linear_end) == ("linear", 1e-5)
    assert (config.weight_decay, config.grad_clip_norm, config.loss) == (0.03, 1.0, "sigmoid_xent")
    # 90 epochs of the 14,145,922 ImageNet-21k training images at 4096 per step.
    assert config.total_steps == 310_824 == math.ceil(90 * (14_197_122 - 51_200) / 4096)
    assert config.dataset.startswith("records:")  # prepared once by vit_jax.prepare_data
    assert (config.train_split, config.test_split) == ("train", "test")
    if "transformer" in config.model:  # ViT and hybrids; Mixer has none of these options
        # Dropout 0.1 for B and larger (ViT paper, appendix B.1; DeiT-B too, the recipe goes by
        # width); none for Ti, S and testing.
        large = name.split("+")[-1].startswith(("ViT-B", "ViT-L", "ViT-H", "DeiT-B"))
        assert config.model.transformer.dropout_rate == (0.1 if large else 0.0)
        assert config.model.representation_size == config.model.hidden_size
        assert config.model.head_bias_init == -10.0


def test_pretrain_defaults_to_vit_b16_and_its_model_gets_the_recipe_options():
    assert pretrain.get_config().model.model_name == "ViT-B_16"
    model = run_config.make_model(pretrain.get_config("ViT-B_16"), num_classes=21_843)
    assert (model.head_bias_init, model.representation_size) == (-10.0, 768)
    assert model.transformer["dropout_rate"] == 0.1  # the trained bias: tests/test_e2e.py


@pytest.mark.parametrize("dataset", FINETUNE_DATASETS)
@pytest.mark.parametrize("name", ["ViT-B_16", "R50+ViT-B_16", "Mixer-B_16", "ViT-L_16"])
def test_finetune_recipe_for_every_preset(name, dataset):
    config = finetune.get_config(f"{name},{dataset}")
    run_config.validate_config(config, 8, 8)
    assert (config.dataset, config.model.model_name) == (dataset, name)
    train_split, test_split, steps, warmup = RECIPE_STEPS[dataset]
    assert (config.train_split, config.test_split) == (train_split, test_split)
    assert (config.total_steps, config.warmup_steps) == (steps, warmup)
    # Mixer at its released checkpoints' 224 px (the token-mixing weights fix the grid).
    assert (config.image_size, config.batch_size) == (224 if "Mixer" in name else 384, 512)
    assert config.eval_every == 100  # the original's evaluation interval
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 0.0)
    assert (config.grad_clip_norm, config.decay_type, config.linear_end) == (1.0, "cosine", 0.0)
    assert (config.loss, config.optim_dtype, config.pretrained) == ("softmax_xent", "bfloat16", "")
    expected_lr = 0.01 if (name, dataset) == ("ViT-B_16", "cifar10") else 0.03
    assert config.base_lr == expected_lr


@pytest.mark.parametrize("name", POOLED + RELATIVE)
def test_finetune_image_size_tiles_for_every_model(name):
    config = finetune.get_config(f"{name},imagenet2012")
    run_config.validate_config(config, 8, 8)  # Swin: 384 px tiles into windows of 12
    expected = 392 if name == "ViT-H_14" else 224 if name.startswith("Mixer") else 384
    assert config.image_size == expected  # 28 × 14 = 392 is the first multiple of 14 ≥ 384


@pytest.mark.parametrize("name", RELATIVE)
def test_swin_and_beit_fine_tune_with_their_authors_recipes(name):
    """The Swin authors' 22k→1k fine-tuning and BEiT's fine-tuning of its 22k weights, per batch
    of 512; a Swin model at 384 px has windows of 12, its tables resampled from the file's."""
    config = finetune.get_config(f"{name},imagenet2012")
    assert (config.optimizer, config.base_lr, config.batch_size) == ("adamw", 2e-5, 512)
    assert (config.weight_decay, config.label_smoothing, config.loss) == (1e-8, 0.1, "softmax_xent")
    assert (config.total_steps, config.warmup_steps) == RECIPE_STEPS["imagenet2012"][2:]
    model = run_config.make_model(config, num_classes=1000)
    if models.family(name) == "swin":
        assert model.window_size == 12
        assert (config.mixup_alpha, config.cutmix_alpha, config.grad_clip_norm) == (0.8, 1.0, 5.0)
        assert (config.drop_path_rate, config.layer_decay, config.linear_end) == (0.2, 1.0, 2e-7)
    else:
        large = name == "BEiT-L_16"
        assert (config.mixup_alpha, config.cutmix_alpha, config.grad_clip_norm) == (0.0, 0.0, 0.0)
        assert config.drop_path_rate == (0.4 if large else 0.1)
        assert (config.layer_decay, config.linear_end) == (0.9 if large else 0.85, 1e-6)
    assert model.drop_path_rate == config.drop_path_rate  # reaches the model


# The original fine-tunes with the zoo config unchanged; its table (the original's
# configs/models.py) gives these dropout rates.
ORIGINAL_DROPOUT = {
    "ViT-B_16": 0.0,
    "ViT-B_32": 0.0,
    "ViT-S_16": 0.0,
    "R50+ViT-B_16": 0.1,
    "testing": 0.1,
    "ViT-L_16": 0.1,
    "ViT-L_32": 0.0,
    "R50+ViT-L_32": 0.1,
    "ViT-H_14": 0.1,
}


@pytest.mark.parametrize(("name", "dropout"), ORIGINAL_DROPOUT.items())
def test_finetune_dropout_is_the_original_zoo_value(name, dropout):
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
    "make",
    [default_config.get_config, pretrain.get_config, finetune.get_config],
    ids=["default", "pretrain", "finetune"],  # stable ids: parallel workers must agree
)
def test_run_configs_are_locked(make):
    config = make()
    target = config.finetune if "phases" in config else config
    with pytest.raises(AttributeError, match="batchsize"):
        target.batchsize = 3


# ----------------------------------------------------------------------------------------------
# Mixer fine-tuning loads released Mixer files (their token count fixes the resolution).


def _small_mixer_preset(image_size=None):
    """The Mixer-B_16 preset with a tiny Mixer of the same patch size (same token count)."""
    config = finetune.get_config("Mixer-B_16,cifar10")
    config.model.update(hidden_dim=8, num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=8)
    if image_size:
        config.image_size = image_size
    return config


def _released_mixer_file(tmp_path, image_size):
    """A released-format file of that tiny Mixer trained at `image_size` (1000-class head)."""
    config = _small_mixer_preset()
    model = models.MlpMixer(num_classes=1000, **config.model)
    images = jnp.zeros((1, image_size, image_size, 3))
    params = _compiled.init_params(model, images, seed=1)
    path = tmp_path / "Mixer-B_16.npz"
    checkpoint.save(params, path)
    return path, params


def test_mixer_preset_loads_a_released_format_mixer_file(tmp_path):
    path, released = _released_mixer_file(tmp_path, 224)  # the released files' resolution
    config = _small_mixer_preset()
    config.pretrained = str(path)
    model = run_config.make_model(config, num_classes=10)
    state = train.create_state(config, model, run_config.make_schedule(config))
    token_kernel = ("MixerBlock_0", "token_mixing", "Dense_0", "kernel")
    loaded, want = state.params, released
    for part in token_kernel:
        loaded, want = loaded[part], want[part]
    np.testing.assert_array_equal(loaded, want)  # 196 × 4: the checkpoint's own weights
    assert state.params["head"]["kernel"].shape == (8, 10)  # fresh head for the new classes


def test_a_mixer_file_of_another_token_count_names_the_resolution_it_needs(tmp_path):
    path, _ = _released_mixer_file(tmp_path, 224)
    config = _small_mixer_preset(image_size=384)  # 576 tokens, the file has 196
    config.pretrained = str(path)
    model = run_config.make_model(config, num_classes=10)
    with pytest.raises(checkpoint.CheckpointError, match=r"196 tokens.*576.*image_size=224"):
        train.create_state(config, model, run_config.make_schedule(config))


def test_a_multi_phase_workdir_as_pretrained_resolves_to_its_last_phase(tmp_path):
    for phase, offset in (("pretrain", 0), ("finetune", 1)):  # finetune written last
        (tmp_path / phase).mkdir()
        target = tmp_path / phase / checkpoint.PARAMS_FILE
        target.write_bytes(b"")
        os.utime(target, (1_000_000 + offset, 1_000_000 + offset))
    resolved = checkpoint.resolve_params_file(tmp_path)
    assert resolved == str(tmp_path / "finetune" / checkpoint.PARAMS_FILE)
    assert predict.resolve_checkpoint(tmp_path) == resolved  # one resolver for both


def test_the_finetune_recipe_names_image_folders_as_the_input_pipeline_does():
    from vit_jax import input_pipeline

    assert finetune.FOLDER == input_pipeline.FOLDER_PREFIX
    assert finetune.RECORDS == input_pipeline.RECORDS_PREFIX
    assert common.PATH_PREFIXES == (input_pipeline.FOLDER_PREFIX, input_pipeline.RECORDS_PREFIX)
