"""MAE pretraining recipe (He et al. 2021): `configs/pretrain_mae.py:<model>[,<dataset>]`.

    python -m vit_jax.main --workdir=/tmp/mae_b16 \
        --config=configs/pretrain_mae.py:ViT-B_16 --config.dataset=records:/path/to/in1k

The encoder is the zoo ViT (its parameter names, exported as `encoder.npz`) with dropout 0; its
GELU stays the zoo's tanh form (MAE's PyTorch models use the exact one). 75 % of the patches are
masked per image; the decoder has 8 blocks of width 512 with 16 heads; the loss is the MSE on
the masked patches' pixels, each patch normalised by its own mean and variance. The labels are
not read.

Settings, the paper's: 224 px, batch 4096, AdamW β = (0.9, 0.95), weight decay 0.05 (kernels),
lr 1.5e-4 · batch / 256 = 2.4e-3, 800 epochs with 40 warmup epochs and cosine decay to 0, no
gradient clipping, random-resized crop of 20–100 % of the image and flip only. Epochs are
counted on the dataset's training size (`configs/common.IMAGE_DATASETS`). Fine-tune the result
with `configs/finetune_mae.py:<model>,<dataset> --config.pretrained=<this workdir>`; the paper's
ViT-B/16 reaches 83.6 % ImageNet top-1 that way (not reproduced here: no accelerator). Watch
representation quality without fine-tuning with `--config.fewshot.every=<steps>` (few-shot
linear accuracy into TensorBoard).
"""

from __future__ import annotations

import ml_collections

from configs import common

IMAGE_SIZE = 224
BATCH_SIZE = 4096
BASE_LR_PER_256 = 1.5e-4
EPOCHS = 800
WARMUP_EPOCHS = 40


def get_config(arg: str = "ViT-B_16,imagenet2012") -> ml_collections.ConfigDict:
    c, model_name, steps_per_epoch = common.image_recipe(
        arg, "pretrain_mae", "MAE", "ViT-B_16", BATCH_SIZE
    )
    c.model = common.model_config(
        model_name, transformer={"dropout_rate": 0.0, "attention_dropout_rate": 0.0}
    )
    c.task = "mae"
    c.loss = "mse"
    c.image_size = IMAGE_SIZE
    c.crop_min_area = 0.2
    c.optimizer = "adamw"
    c.adam_b1, c.adam_b2 = 0.9, 0.95
    c.weight_decay = 0.05
    c.grad_clip_norm = 0.0
    c.base_lr = BASE_LR_PER_256 * BATCH_SIZE / 256
    c.total_steps = EPOCHS * steps_per_epoch
    c.warmup_steps = WARMUP_EPOCHS * steps_per_epoch
    c.decay_type = "cosine"
    c.linear_end = 0.0
    c.eval_every = 20 * steps_per_epoch
    c.checkpoint_every = steps_per_epoch
    return c
