"""Fine-tuning an MAE encoder (He et al. 2021): `configs/finetune_mae.py:<model>[,<dataset>]`.

    python -m vit_jax.main --workdir=/tmp/mae_b16_ft \
        --config=configs/finetune_mae.py:ViT-B_16 \
        --config.pretrained=/tmp/mae_b16   # the pretraining workdir (its encoder is loaded)

The model is the zoo's global-average-pooled entry of the ViT (`ViT-B_16` →
`ViT-B_16-gap-norep`, `classifier='gap'`: the mean of the patch tokens after the final
LayerNorm; the pretrained class token is dropped, and load_pretrained says so) where the zoo has
one (S and B), else the ViT itself with its class token; no dropout. Settings, the paper's ViT-B
recipe: 224 px, batch 1024, AdamW β = (0.9, 0.999), lr 5e-4 · batch / 256 = 2e-3, weight decay
0.05 (kernels), layer-wise lr decay 0.65 (0.75 for L and H, which also train 50 epochs instead
of 100), 5 warmup epochs and cosine decay to 1e-6, drop path 0.1, label smoothing 0.1, mixup 0.8
and cutmix 1.0, evaluation at 224 of the centre of the image resized to 256. Left out (not
implemented here): RandAugment (9, 0.5) and random erasing 0.25. The paper's ImageNet-1k top-1:
ViT-B 83.6, L 85.9, H 86.9 (not reproduced here: no accelerator).
"""

from __future__ import annotations

import ml_collections

from configs import common
from vit_jax import models

IMAGE_SIZE = 224
BATCH_SIZE = 1024
BASE_LR_PER_256 = 5e-4
LARGE_HIDDEN = 1024  # L and H: layer decay 0.75 and 50 epochs


def pooled_variant(name: str) -> str:
    """The zoo's global-average-pooled entry of `name` (ViT-S/B: '<name>-gap-norep'), if any."""
    pooled = f"{name}-gap-norep"
    return pooled if pooled in models.MODEL_CONFIGS else name


def get_config(arg: str = "ViT-B_16,imagenet2012") -> ml_collections.ConfigDict:
    c, model_name, steps_per_epoch = common.image_recipe(
        arg, "finetune_mae", "MAE", "ViT-B_16", BATCH_SIZE
    )
    c.model = common.model_config(
        pooled_variant(model_name),
        transformer={"dropout_rate": 0.0, "attention_dropout_rate": 0.0},
    )
    large = c.model.hidden_size >= LARGE_HIDDEN
    epochs = 50 if large else 100
    c.image_size = IMAGE_SIZE
    c.eval_crop = "resize_small_crop"
    c.optimizer = "adamw"
    c.adam_b1, c.adam_b2 = 0.9, 0.999
    c.weight_decay = 0.05
    c.grad_clip_norm = 0.0
    c.base_lr = BASE_LR_PER_256 * BATCH_SIZE / 256
    c.layer_decay = 0.75 if large else 0.65
    c.total_steps = epochs * steps_per_epoch
    c.warmup_steps = 5 * steps_per_epoch
    c.decay_type = "cosine"
    c.linear_end = 1e-6
    c.drop_path_rate = 0.1
    c.label_smoothing = 0.1
    c.mixup_alpha = 0.8
    c.cutmix_alpha = 1.0
    c.eval_every = 5 * steps_per_epoch
    c.checkpoint_every = steps_per_epoch
    c.keep_best = True
    return c
