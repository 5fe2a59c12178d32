"""Fine-tuning recipe (ViT paper Table 4, the original vit_jax defaults): `<model>,<dataset>`.

    python -m vit_jax.main --workdir=/tmp/ft_b16_cifar10 \
        --config=configs/finetune.py:ViT-B_16,cifar10 \
        --config.pretrained=/path/to/imagenet21k/ViT-B_16.npz

384 px for ViT and hybrid models (rounded up to a multiple of the model's patch, e.g. 392 for
ViT-H_14) and 224 px for Mixer models, batch 512, SGD with momentum 0.9 (bfloat16 momentum
buffer), no weight decay, gradient clip at global norm 1, softmax cross-entropy, 500 linear
warmup steps then cosine decay to 0, base lr 0.03 (0.01 for ViT-B_16 on CIFAR-10), evaluation
every 100 steps (and a full one at the end). The model is the zoo's, unchanged, as the original
fine-tunes it: dropout 0.1 for ViT-L_16, ViT-H_14, R50+ViT-B_16 and R50+ViT-L_32, 0 for the rest.
Mixer's token-mixing weights are sized by the number of patches, so a Mixer is fine-tuned at the
resolution its released checkpoints were trained at (224 px: 196 patches of 16 px, 49 of 32 px);
a Mixer checkpoint of another token count says which resolution it needs. Datasets, with their
splits and steps:

    cifar10, cifar100     train[:98%] / test        10,000 steps, warmup 500
    imagenet2012          train[:99%] / validation  20,000 steps, warmup 500
    oxford_iiit_pet       train[:90%] / test           500 steps, warmup 100
    oxford_flowers102     train[:90%] / test           500 steps, warmup 100
    folder:/path          train / test                 500 steps, warmup 100

`folder:/path` is an image folder with `train/<class>/*` and `test/<class>/*`; its default
duration is that of the small (Pets/Flowers-sized) sets: raise `--config.total_steps` for a larger
folder. Set `--config.pretrained` to a released-format `.npz` (the paper's ImageNet-21k models,
e.g. `wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz`) or to a
pretraining workdir (its `params.npz`); left empty, the model trains from scratch. The head is
replaced and the position table resampled to the new grid.

Swin and BEiT models fine-tune with their authors' AdamW recipes instead (`SWIN`, `BEIT` below;
the dataset's steps, splits and warmup as above, batch 512), at 384 px: Swin with window 12 (the
relative position tables resampled from the checkpoint's window, e.g. 7 → 12), BEiT with its
relative tables resampled from the 14 × 14 grid of 224 px to 24 × 24.

Expected top-1 (ImageNet-21k ViT-B_16 fine-tuned at 384 px on accelerators; the ViT paper's
Table 5 and the original vit_jax README): CIFAR-10 98.95–99.02 %, CIFAR-100 91.7–92.1 %,
ImageNet 84.0–84.5 %. Not reproduced here (no accelerator).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from configs import common
from vit_jax import models

IMAGE_SIZE = 384  # ViT fine-tuning resolution, rounded up to a multiple of the model's patch
# Mixer: the resolution of the released checkpoints (the token-mixing weights fix the grid).
MIXER_IMAGE_SIZE = 224
EVAL_EVERY = 100  # steps between evaluations during fine-tuning (the original's eval_every)


class Preset(NamedTuple):
    train_split: str
    test_split: str
    total_steps: int
    warmup_steps: int


# The keys of every 'folder:/path' and 'records:/path' dataset (see common.PATH_PREFIXES).
FOLDER, RECORDS = common.PATH_PREFIXES
PRESETS: dict[str, Preset] = {
    "cifar10": Preset("train[:98%]", "test", 10_000, 500),
    "cifar100": Preset("train[:98%]", "test", 10_000, 500),
    "imagenet2012": Preset("train[:99%]", "validation", 20_000, 500),
    "oxford_iiit_pet": Preset("train[:90%]", "test", 500, 100),
    "oxford_flowers102": Preset("train[:90%]", "test", 500, 100),
    FOLDER: Preset("train", "test", 500, 100),
    RECORDS: Preset("train", "test", 500, 100),
}
BASE_LR = 0.03
BASE_LR_EXCEPTIONS = {("ViT-B_16", "cifar10"): 0.01}  # (model, dataset): base lr

# The Swin and BEiT authors' fine-tuning of their ImageNet-21k(-fine-tuned) weights, as config keys.
# Swin (Swin-Transformer's swin_base_*_22kto1k_finetune.yaml files with its config.py defaults;
# the same recipe is used for every Swin here): AdamW, base lr
# 2e-5 and min lr 2e-7 per 512 images a step (its main.py scales both by batch / 512), weight
# decay 1e-8 (not on biases, norms or the relative tables: this optimiser decays kernels only),
# label smoothing 0.1, mixup 0.8 and cutmix 1.0 (one per batch), gradient clip 5, drop path 0.2,
# window 12 at 384 px. BEiT (unilm's beit fine-tuning of the pt22k-ft22k weights, batch 512):
# AdamW, lr 2e-5, min lr 1e-6, weight decay 1e-8, label smoothing 0.1, no mixup, no clipping;
# layer decay 0.85 and drop path 0.1 for B, 0.9 and 0.4 for L.
SWIN = dict(
    optimizer="adamw",
    base_lr=2e-5,
    linear_end=2e-7,
    weight_decay=1e-8,
    label_smoothing=0.1,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    grad_clip_norm=5.0,
    drop_path_rate=0.2,
)
SWIN_WINDOW = 12  # at 384 px, as swin_*_window12_384: the last stage (12 × 12) is one window
BEIT = dict(
    optimizer="adamw",
    base_lr=2e-5,
    linear_end=1e-6,
    weight_decay=1e-8,
    label_smoothing=0.1,
    grad_clip_norm=0.0,
    layer_decay=0.85,
    drop_path_rate=0.1,
)
BEIT_SIZES = {"BEiT-L_16": dict(layer_decay=0.9, drop_path_rate=0.4)}  # L's values of the above


def get_config(arg: str = "ViT-B_16,cifar10") -> ml_collections.ConfigDict:
    model_name, dataset = _parse(arg)
    preset = PRESETS[common.preset_key(dataset)]
    c = common.get_config()
    c.dataset = dataset
    c.train_split = preset.train_split
    c.test_split = preset.test_split
    c.model = common.model_config(model_name)  # the zoo's, unchanged (unknown names fail here)
    c.image_size = _image_size(c.model)
    c.batch_size = 512
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.optim_dtype = "bfloat16"  # the momentum buffer; the update itself is float32
    c.weight_decay = 0.0
    c.grad_clip_norm = 1.0
    c.base_lr = BASE_LR_EXCEPTIONS.get((model_name, dataset), BASE_LR)
    c.total_steps = preset.total_steps
    c.warmup_steps = preset.warmup_steps
    c.decay_type = "cosine"
    c.linear_end = 0.0
    c.loss = "softmax_xent"
    c.eval_every = EVAL_EVERY
    c.pretrained = ""  # set on the command line: a released .npz or a pretraining workdir
    family = models.family(model_name)
    if family in ("swin", "beit"):
        recipe = SWIN if family == "swin" else {**BEIT, **BEIT_SIZES.get(model_name, {})}
        c.update(recipe, optim_dtype="float32")  # AdamW's first moment in float32
    if family == "swin":
        c.model.window_size = SWIN_WINDOW
    return c


def _parse(arg: str) -> tuple[str, str]:
    """'<model>,<dataset>' → (model, dataset); a dataset without preset fails listing them."""
    model_name, sep, dataset = (part.strip() for part in arg.partition(","))
    valid = common.valid_datasets(PRESETS)
    if not sep or not model_name or not dataset:
        raise ValueError(
            f"configs/finetune.py takes '<model>,<dataset>', e.g. "
            f"'--config=configs/finetune.py:ViT-B_16,cifar10', got {arg!r}. Datasets: {valid}."
        )
    common.check_preset_dataset(dataset, PRESETS, "fine-tuning")
    return model_name, dataset


def _image_size(model: ml_collections.ConfigDict) -> int:
    """224 px for a Mixer (its checkpoints' grid), else 384 px rounded up to the patch."""
    if models.model_class(model.model_name) is models.MlpMixer:
        return MIXER_IMAGE_SIZE
    if models.family(model.model_name) == "swin":
        return IMAGE_SIZE  # 384 = 12 windows of 12 at the last stage (patch 4, 3 mergings)
    return common.round_up_to_patch(IMAGE_SIZE, model)
