"""ImageNet-21k pretraining recipe (ViT paper, Appendix B.1): `configs/pretrain.py:<model>`.

    python -m vit_jax.prepare_data --folder=/path/to/imagenet21k --out=/path/to/in21k_records \
        --holdout=51200
    python -m vit_jax.main --workdir=/tmp/pretrain_b16 \
        --config=configs/pretrain.py:ViT-B_16 \
        --config.dataset=records:/path/to/in21k_records

224 px, batch 4096, AdamW (β1 0.9, β2 0.999, decoupled weight decay 0.03 on kernels), lr 1e-3
after 10k linear warmup steps, then linear decay to 1e-5, gradient clip at global norm 1,
dropout 0.1 for B and larger models (hidden size ≥ 768: B, L, H and their hybrids) and 0 for Ti
and S (the ViT paper's appendix B.1 regularises the larger models), a tanh representation layer
of the hidden size, sigmoid cross-entropy with the head bias initialised to −10, 90 epochs. The
model defaults to ViT-B_16; Mixer models have no dropout, representation layer or head-bias
option, so only the optimisation part of the recipe applies.

Data: ImageNet-21k is not a registered tfds builder, and reading its 14M files as an image
folder (`folder:`) would decode every file at each start; the recipe reads records prepared
once by `python -m vit_jax.prepare_data` (`records:<dir>`: start-up reads the manifest only,
training reads each global batch's records by index, resuming costs no reading). Its class
folders `<root>/<wnid>/*.JPEG` (21,843 for the paper's version) become split 'train', and
`--holdout=51200` holds out 51,200 images as 'test', as big_vision does ('full[51200:]' for
training; there the first 51,200 of its split, here a seeded sample stratified over the
classes). An image folder with train/ and test/ (`folder:`) or a tfds name
(`--config.dataset=<name> --config.train_split=... --config.test_split=...`) also works. The
classes are counted from the data. Fine-tune the result with
`configs/finetune.py:<model>,<dataset> --config.pretrained=<this workdir>`; the paper's ViT-B_16
pretrained this way reaches 84.0–84.5 % ImageNet top-1 after that fine-tuning at 384 px (the ViT
paper's Table 5; not reproduced here).
"""

from __future__ import annotations

import math

import ml_collections

from configs import common

DATASET = "records:/path/to/in21k_records"  # placeholder: set --config.dataset to your copy
# ImageNet-21k (fall 2011 release) holds 14,197,122 images; 51,200 are held out for test/ (as
# big_vision's split 'full[51200:]'), leaving 14,145,922 training images.
TRAIN_EXAMPLES = 14_197_122 - 51_200
BATCH_SIZE = 4096
EPOCHS = 90
# 90 epochs × 14,145,922 images / 4096 per step = 310,823.5 → 310,824 steps (rounded up). The
# step count is fixed here: a different --config.batch_size changes the epochs, not the steps.
TOTAL_STEPS = math.ceil(EPOCHS * TRAIN_EXAMPLES / BATCH_SIZE)
DROPOUT = 0.1  # for models of at least DROPOUT_MIN_HIDDEN (B and larger); Ti and S: none
DROPOUT_MIN_HIDDEN = 768


def get_config(arg: str = "ViT-B_16") -> ml_collections.ConfigDict:
    c = common.get_config()
    c.dataset = DATASET
    c.train_split = "train"
    c.test_split = "test"
    c.image_size = 224
    c.model = _model(arg.strip())
    c.batch_size = BATCH_SIZE
    c.optimizer = "adamw"
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.weight_decay = 0.03
    c.grad_clip_norm = 1.0
    c.base_lr = 1e-3
    c.total_steps = TOTAL_STEPS
    c.warmup_steps = 10_000
    c.decay_type = "linear"
    c.linear_end = 1e-5
    c.loss = "sigmoid_xent"
    return c


def _model(name: str) -> ml_collections.ConfigDict:
    """The zoo ViT with the recipe's dropout, representation_size = hidden and head bias −10."""
    config = common.model_config(name)  # unknown names fail here, listing close matches
    if "transformer" not in config:  # Mixer: none of these options exist
        return config
    dropout = DROPOUT if config.hidden_size >= DROPOUT_MIN_HIDDEN else 0.0
    return common.model_config(
        name,
        transformer={"dropout_rate": dropout},
        representation_size=config.hidden_size,
        head_bias_init=-10.0,
    )
