"""Regression fine-tuning recipe (the Kaggle PetFinder "Pawpularity" task): `<model>,<csv>`.

    python -m vit_jax.main --workdir=/tmp/paw_b16_fold0 \
        --config=configs/regression.py:ViT-B_16,/data/petfinder/train.csv \
        --config.pretrained=/path/to/imagenet21k/ViT-B_16.npz --config.csv.fold=0

The CSV names each image by its id (`<csv dir>/train/<Id>.jpg` for `<csv dir>/train.csv`) and
holds the target (`Pawpularity`, 1–100). 5-fold cross-validation, stratified over 10 quantile
bins of the target and seeded: fold `i` is the 'validation' split of `--config.csv.fold=i`, so
the usual 5-fold run is five commands (`fold=0` … `fold=4`), each evaluating every validation
image once.

Settings, the starting point of the regression notes this codebase follows (ViT-B/16 fine-tuned
untuned to RMSE 20.51, the target's standard deviation being about 20.6): 224 px, batch 128,
lr 1e-3 with 1 epoch of linear warmup and cosine decay, 10 epochs (620 steps of 7,930
training images), evaluation every epoch with the best epoch's params kept
(`best_params.npz`, the early-stopping result), head Linear(D, 128) → GELU → Linear(128, 1) on
the pooled features. The notes do not state the optimizer; AdamW (β = 0.9, 0.999, decoupled
weight decay 0.01 on kernels) is used here. Loss: MSE on the standardised target; the
competition's sigmoid trick is `--config.loss=sigmoid_bce --config.regression.target_range=(0,100)`.
The twelve 0/1 metadata columns can be fed to the head with the image features:
`--config.csv.feature_columns="('Subject Focus','Eyes','Face','Near','Action','Accessory',
'Group','Collage','Human','Occlusion','Info','Blur')"`.
"""

from __future__ import annotations

import math

import ml_collections

from configs import common
from vit_jax import models
from vit_jax.csv_dataset import CSV_PREFIX

IMAGE_SIZE = 224  # rounded up to a multiple of the model's patch
BATCH_SIZE = 128
TRAIN_IMAGES = 7_930  # Pawpularity's 9,912 training rows less one validation fold of five
EPOCHS = 10
HEAD_HIDDEN_SIZE = 128


def get_config(arg: str = "ViT-B_16,/data/petfinder/train.csv") -> ml_collections.ConfigDict:
    model_name, csv_path = _parse(arg)
    steps_per_epoch = math.ceil(TRAIN_IMAGES / BATCH_SIZE)
    c = common.get_config()
    c.task = "regression"
    c.loss = "mse"
    c.dataset = CSV_PREFIX + csv_path
    c.train_split = "train"
    c.test_split = "validation"
    c.model = common.model_config(model_name)
    c.image_size = _image_size(c.model)
    c.head_hidden_size = HEAD_HIDDEN_SIZE
    c.batch_size = BATCH_SIZE
    c.optimizer = "adamw"
    c.weight_decay = 0.01
    c.grad_clip_norm = 1.0
    c.base_lr = 1e-3
    c.total_steps = EPOCHS * steps_per_epoch
    c.warmup_steps = steps_per_epoch
    c.decay_type = "cosine"
    c.eval_every = steps_per_epoch
    c.log_every = 10
    c.keep_best = True
    c.pretrained = ""  # set on the command line: a released .npz or a pretraining workdir
    return c


def _parse(arg: str) -> tuple[str, str]:
    model_name, sep, csv_path = (part.strip() for part in arg.partition(","))
    if csv_path.startswith(CSV_PREFIX):
        csv_path = csv_path[len(CSV_PREFIX) :]
    if not sep or not model_name or not csv_path.endswith(".csv"):
        raise ValueError(
            "configs/regression.py takes '<model>,<path to the training CSV>', e.g. "
            f"'--config=configs/regression.py:ViT-B_16,/data/petfinder/train.csv', got {arg!r}."
        )
    return model_name, csv_path


def _image_size(model: ml_collections.ConfigDict) -> int:
    """224 px rounded up to the patch; a Mixer's released 224 px (its token count fixes the
    grid); a Swin at its checkpoints' resolution (224 px for window 7, 384 for window 12)."""
    if models.model_class(model.model_name) is models.MlpMixer:
        return IMAGE_SIZE
    if models.family(model.model_name) == "swin":
        return models.default_image_size(model.model_name)
    return common.round_up_to_patch(IMAGE_SIZE, model)
