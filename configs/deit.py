"""DeiT training recipe (Touvron et al. 2020): `<model>[,<dataset>]`, ImageNet-1k by default.

    python -m vit_jax.main --workdir=/tmp/deit_s \
        --config=configs/deit.py:DeiT-S_16

    python -m vit_jax.main --workdir=/tmp/deit_s_dist \
        --config=configs/deit.py:DeiT-S_16-dist \
        --config.distill.teacher_model=ViT-B_16 \
        --config.distill.teacher_checkpoint=/path/to/teacher_workdir

A plain model (`DeiT-{Ti,S,B}_16`, or any zoo ViT) trains as a classifier; a distilled one
(`DeiT-*-dist`) trains with `task='distillation'` and needs a teacher trained on the same
classes (a zoo name and its checkpoint: `.npz` or workdir). The paper's teacher, RegNetY-16GF,
is not in the zoo; a ViT, hybrid or Mixer checkpoint serves. Hard distillation by default (the
paper's best); `--config.distill.type=soft` gives α = 0.1, τ = 3.

Settings, the paper's: 224 px, batch 1024, AdamW (β = 0.9, 0.999) at lr 5e-4 · batch/512
= 1e-3, weight decay 0.05 (kernels only: not biases, norms, position table or the class and
distillation tokens, as DeiT's no-weight-decay list), no gradient clipping, 300 epochs with
5 linear warmup epochs and cosine decay to 1e-5, label smoothing 0.1, stochastic depth 0.1,
mixup 0.8 and cutmix 1.0 (one of them per batch, half each), random crop + flip, evaluation
at 224 of the centre of the image resized to 256 (`resize_small_crop`). Not implemented
here, so left out: RandAugment (9, 0.5), random erasing 0.25 and repeated augmentation (their
effect on these numbers is not measured here). Epochs are counted in steps of the dataset's
training size:

    imagenet2012   train / validation   1,281,167 images
    cifar10        train / test            50,000 images
    cifar100       train / test            50,000 images
    folder:/path   train / test     (ImageNet's size: set --config.total_steps)
    records:/path  train / test     (the same, prepared by vit_jax.prepare_data)

Expected ImageNet-1k top-1 (the paper's Table 5, on GPUs): DeiT-Ti 72.2, S 79.8, B 81.8;
distilled (RegNetY-16GF teacher) Ti 74.5, S 81.2, B 83.4. Not reproduced here (no accelerator).
"""

from __future__ import annotations

import ml_collections

from configs import common

IMAGE_SIZE = 224
BATCH_SIZE = 1024
BASE_LR_PER_512 = 5e-4  # lr = 5e-4 · batch / 512
EPOCHS = 300
WARMUP_EPOCHS = 5
MIN_LR = 1e-5


def get_config(arg: str = "DeiT-S_16,imagenet2012") -> ml_collections.ConfigDict:
    c, model_name, steps_per_epoch = common.image_recipe(
        arg, "deit", "DeiT", "DeiT-S_16", BATCH_SIZE
    )
    c.model = common.model_config(model_name)  # unknown names fail here, listing close ones
    c.task = "distillation" if c.model.get("distilled") else "classification"
    c.image_size = IMAGE_SIZE
    c.eval_crop = "resize_small_crop"
    c.optimizer = "adamw"
    c.adam_b1, c.adam_b2 = 0.9, 0.999
    c.weight_decay = 0.05
    c.grad_clip_norm = 0.0
    c.base_lr = BASE_LR_PER_512 * BATCH_SIZE / 512
    c.total_steps = EPOCHS * steps_per_epoch
    c.warmup_steps = WARMUP_EPOCHS * steps_per_epoch
    c.decay_type = "cosine"
    c.linear_end = MIN_LR
    c.loss = "softmax_xent"
    c.label_smoothing = 0.1
    c.drop_path_rate = 0.1
    c.mixup_alpha = 0.8
    c.cutmix_alpha = 1.0
    c.eval_every = 10 * steps_per_epoch
    c.checkpoint_every = steps_per_epoch
    c.distill.type = "hard"
    return c
