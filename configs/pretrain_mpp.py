"""Masked patch prediction (ViT paper, B.1.2): `configs/pretrain_mpp.py:<model>[,<dataset>]`.

    python -m vit_jax.main --workdir=/tmp/mpp_b16 \
        --config=configs/pretrain_mpp.py:ViT-B_16 --config.dataset=records:/path/to/in1k

Half of the patch embeddings are corrupted (80 % replaced by a learned [mask] embedding, 10 % by
another patch's embedding, 10 % left as they are) and each corrupted patch's 3-bit mean colour
(512 classes) is predicted from its output token with softmax cross-entropy
(`--config.mpp.target=color_4x4` for the 4×4-downsized patch's 16 colours, or `pixels` with
`--config.loss=mse` for L2 on the pixels). The labels are not read.

Settings, the paper's: 224 px, batch 4096, Adam (β = 0.9, 0.999) at lr 2e-4, 10k linear warmup
steps then cosine decay, gradient clip at global norm 1, dropout as the supervised pretraining
(0.1 for B and larger). The paper trains on JFT for 1M steps and notes that 100k steps on
ImageNet gave similar gains; the recipe takes the latter. Fine-tune with
`configs/finetune.py:<model>,<dataset> --config.pretrained=<this workdir>`: the paper's
ViT-B/16 reaches 79.9 % ImageNet top-1 that way, 2 points above training from scratch (not
reproduced here: no accelerator).
"""

from __future__ import annotations

import ml_collections

from configs import common, pretrain

TOTAL_STEPS = 100_000
WARMUP_STEPS = 10_000


def get_config(arg: str = "ViT-B_16,imagenet2012") -> ml_collections.ConfigDict:
    c, model_name, _ = common.image_recipe(arg, "pretrain_mpp", "MPP", "ViT-B_16", 4096)
    model = common.model_config(model_name)
    if "transformer" in model:
        dropout = pretrain.DROPOUT if model.hidden_size >= pretrain.DROPOUT_MIN_HIDDEN else 0.0
        model = common.model_config(model_name, transformer={"dropout_rate": dropout})
    c.model = model
    c.task = "mpp"
    c.loss = "softmax_xent"
    c.image_size = 224
    c.optimizer = "adam"
    c.adam_b1, c.adam_b2 = 0.9, 0.999
    c.grad_clip_norm = 1.0
    c.base_lr = 2e-4
    c.total_steps = TOTAL_STEPS
    c.warmup_steps = WARMUP_STEPS
    c.decay_type = "cosine"
    c.linear_end = 0.0
    c.eval_every = 5_000
    c.checkpoint_every = 1_000
    return c
