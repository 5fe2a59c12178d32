"""Helpers shared by the run configs.

Run configs describe the model by zoo name plus overrides and store the resulting constructor
arguments in `config.model`, so a run's saved config records exactly what was built.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from vit_jax import models, models_vit


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`config.model` for zoo model `name`: its constructor arguments with `overrides` applied.

    Unknown names fail listing close matches; unknown keys fail listing the valid ones.
    """
    return models.model_config(name, **overrides)


def round_up_to_patch(size: int, model: ml_collections.ConfigDict) -> int:
    """`size` rounded up to a multiple of the model's patch (times a hybrid stem's stride): the
    resolution a recipe of `size` px trains a ViT, hybrid or BEiT at (392 for ViT-H_14 at 384)."""
    step = math.lcm(*model.patches.size) * models_vit.stem_stride(model.get("resnet"))
    return math.ceil(size / step) * step


# Dataset names that carry a path (input_pipeline.FOLDER_PREFIX and RECORDS_PREFIX, written out so
# that loading a recipe does not import TensorFlow: tests/test_configs.py checks they agree).
PATH_PREFIXES = ("folder:", "records:")


def preset_key(dataset: str) -> str:
    """The presets key of `dataset`: its path prefix ('folder:', 'records:') or the name."""
    return next((p for p in PATH_PREFIXES if dataset.startswith(p)), dataset)


def valid_datasets(presets: Any) -> str:
    return ", ".join(f"{d}/path" if d in PATH_PREFIXES else d for d in presets)


def check_preset_dataset(dataset: str, presets: Any, recipe: str) -> str:
    """`dataset`'s key in a recipe's `presets` (`preset_key`); ValueError naming the recipe and
    listing the valid datasets for one without a preset."""
    key = preset_key(dataset)
    if dataset in PATH_PREFIXES or key not in presets:
        raise ValueError(
            f"No {recipe} preset for dataset {dataset!r}; valid: {valid_datasets(presets)}. For "
            "another tfds dataset start from a preset and override --config.dataset, "
            "--config.train_split, --config.test_split and --config.total_steps."
        )
    return key


# Image datasets the ImageNet-1k recipes (DeiT, MAE, masked patches) count epochs on:
# name → (train split, test split, training images). A folder or records stands for ImageNet.
IMAGE_DATASETS: dict[str, tuple[str, str, int]] = {
    "imagenet2012": ("train", "validation", 1_281_167),
    "cifar10": ("train", "test", 50_000),
    "cifar100": ("train", "test", 50_000),
    "folder:": ("train", "test", 1_281_167),
    "records:": ("train", "test", 1_281_167),
}


def parse_model_dataset(
    arg: str, recipe: str, title: str, example_model: str, presets: Any = IMAGE_DATASETS
) -> tuple[str, str]:
    """A recipe's '<model>[,<dataset>]' argument → (model, dataset), ImageNet by default; a
    dataset without a preset fails listing them (`check_preset_dataset`)."""
    model_name, _, dataset = (part.strip() for part in arg.partition(","))
    dataset = dataset or "imagenet2012"
    if not model_name:
        raise ValueError(
            f"configs/{recipe}.py takes '<model>[,<dataset>]', e.g. "
            f"'--config=configs/{recipe}.py:{example_model}', got {arg!r}. Datasets: "
            f"{valid_datasets(presets)}."
        )
    check_preset_dataset(dataset, presets, title)
    return model_name, dataset


def image_recipe(
    arg: str, recipe: str, title: str, example_model: str, batch_size: int
) -> tuple[ml_collections.ConfigDict, str, int]:
    """The start of an ImageNet-1k recipe: (config with the dataset and its splits set, the
    model name, steps per epoch at `batch_size`) from its '<model>[,<dataset>]' argument."""
    model_name, dataset = parse_model_dataset(arg, recipe, title, example_model)
    train_split, test_split, train_images = IMAGE_DATASETS[preset_key(dataset)]
    c = get_config()
    c.dataset, c.train_split, c.test_split = dataset, train_split, test_split
    c.batch_size = batch_size
    return c, model_name, math.ceil(train_images / batch_size)


def get_config() -> ml_collections.ConfigDict:
    """Every key `train.train_and_evaluate` reads, with its default; recipes change a few fields.

    The result is locked: assigning a key not declared here fails (also from the command line).
    """
    c = ml_collections.ConfigDict()
    # Data.
    # A tfds name, 'folder:/path', 'records:/path' (written by `python -m vit_jax.prepare_data`),
    # 'csv:/path/train.csv' or the embedded 'sklearn_digits'.
    c.dataset = "sklearn_digits"
    c.train_split = "train"  # split to train on (tfds slicing allowed: 'train[:98%]')
    c.test_split = "test"  # split to evaluate on; every example is counted once
    c.data_dir = ""  # tfds data_dir ('' = tfds default)
    c.manual_dir = ""  # tfds manual_dir for datasets downloaded by hand ('' = tfds default)
    c.image_size = 32  # train and eval resolution (pixels, square)
    c.eval_crop = "resize"  # 'resize' (the original) or 'resize_small_crop'
    c.shuffle_buffer = 50_000  # tfds shuffle buffer (the original's; others: whole epochs)
    c.crop_min_area = 0.05  # training crops keep 5–100 % of the image (MAE's recipe: 0.2)
    c.input_workers = 0  # parallel decode-and-augment calls of training input (0: one per core)
    # A 'csv:' dataset: images named by an id column, real-valued targets (task='regression').
    c.csv = ml_collections.ConfigDict()
    c.csv.id_column = "Id"  # image file = <image_dir>/<id><image_ext>
    c.csv.target_columns = ("Pawpularity",)  # the regression targets
    c.csv.feature_columns = ()  # numeric columns fed to the head with the image features
    c.csv.image_dir = ""  # '' = beside the CSV, named as it: <root>/train.csv → <root>/train/
    c.csv.image_ext = ".jpg"
    c.csv.num_folds = 5  # K-fold cross-validation, stratified over target bins (0 = no folds)
    c.csv.fold = 0  # the fold held out as the 'validation' split
    c.csv.holdout_fraction = 0.0  # with num_folds=0: a seeded held-out fraction instead
    c.csv.stratify_bins = 10  # quantile bins of the first target the folds are stratified over
    c.csv.split_seed = 0
    # Model: zoo name plus constructor overrides (num_classes comes from the dataset).
    c.model = model_config("testing")  # constructor arguments of the zoo model
    # Speed and memory: same parameters (params.npz is always the released layout) and the same
    # fp32 numbers; Mixer models take compute_dtype only.
    c.compute_dtype = "float32"  # 'float32' or 'bfloat16' compute; params and logits stay float32
    c.matmul_dtype = ""  # '' (= compute_dtype) or 'bfloat16': bf16 encoder matmuls, fp32 rest
    c.attention_impl = "flax"  # 'flax' (the original) or fused 'auto'/'xla'/'cudnn' (no attn drop)
    c.remat_policy = ""  # '' (none) or a jax.checkpoint_policies name, e.g. 'nothing_saveable'
    c.scan_layers = False  # nn.scan over the encoder blocks: one compiled block, faster compile
    c.batch_chunks = 1  # encoder run per slice of each device's batch: 2 is faster on XLA:CPU
    c.drop_path_rate = 0.0  # stochastic depth of the last ViT block (linear over depth; 0 = off)
    c.head_hidden_size = 0  # 0: the original's linear head; n: Dense(n) → GELU → Dense head
    # Optimisation.
    c.batch_size = 512  # global batch over all devices and processes
    c.accum_steps = 1  # micro-batches per device batch; their gradients are averaged
    c.optimizer = "sgd"  # 'sgd' (momentum), 'adam' or 'adamw' (kernel-only decoupled decay)
    c.base_lr = 0.03  # peak learning rate, reached after warmup
    c.total_steps = 10_000  # optimizer updates
    c.warmup_steps = 500  # linear warmup updates (first update already has base_lr/warmup)
    c.decay_type = "cosine"  # 'cosine' or 'linear' decay to linear_end after warmup
    c.linear_end = 0.0  # learning rate at the last step
    c.grad_clip_norm = 1.0  # global-norm gradient clip (0 = no clipping)
    c.momentum = 0.9  # SGD momentum (0 = plain SGD)
    c.adam_b1 = 0.9  # Adam/AdamW beta1
    c.adam_b2 = 0.999  # Adam/AdamW beta2
    c.optim_dtype = "float32"  # dtype of SGD momentum / Adam first moment: float32 or bfloat16
    c.weight_decay = 0.0  # decoupled weight decay, adamw only, kernels only
    c.layer_decay = 1.0  # layer-wise lr decay: block i's lr × decay^(L − i) (MAE: 0.65; 1 = off)
    # Objective: the task decides targets, head, loss and metrics (vit_jax.tasks).
    # 'classification', 'regression', 'distillation' (DeiT), 'mae' or 'mpp' (self-supervised)
    c.task = "classification"
    # Classification: 'softmax_xent', 'sigmoid_xent' (multi-hot); regression: 'mse', 'sigmoid_bce'.
    c.loss = "softmax_xent"
    c.label_smoothing = 0.0  # mass moved uniformly over all classes (softmax_xent only)
    c.mixup_alpha = 0.0  # mixup Beta(alpha, alpha) mixing of images and labels (0 = off)
    c.cutmix_alpha = 0.0  # cutmix: a Beta(alpha, alpha)-sized box of another image (0 = off);
    # with both on, each batch gets one of them (half the batches each)
    c.regression = ml_collections.ConfigDict()
    c.regression.target_range = ()  # sigmoid_bce: (low, high) mapped to [0, 1]; () = the data's
    # Distillation (task='distillation'): a trained teacher's outputs train the student's
    # distillation head (DeiT-*-dist models), or its one head for a plain model.
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher_model = ""  # the teacher's zoo name
    c.distill.teacher_checkpoint = ""  # its trained params: a .npz or a training workdir
    c.distill.teacher_image_size = 0  # its input size (0 = its checkpoint's); batches resized
    c.distill.teacher_overrides = ""  # JSON model overrides of a non-zoo teacher architecture
    c.distill.type = "hard"  # 'hard' (the teacher's argmax) or 'soft' (KL at temperature tau)
    c.distill.alpha = 0.1  # soft: weight of the KL term (hard: ½ and ½, as in the paper)
    c.distill.tau = 3.0  # soft: temperature
    # Self-supervised pretraining (no labels read): MAE (task='mae', loss='mse') and the ViT
    # paper's masked patch prediction (task='mpp'); fine-tune from the run's params.npz.
    c.mae = ml_collections.ConfigDict()
    c.mae.mask_ratio = 0.75  # share of the patches hidden from the encoder
    c.mae.norm_pix_loss = True  # targets: each patch's pixels normalised by its mean and std
    c.mae.decoder_width = 512
    c.mae.decoder_depth = 8
    c.mae.decoder_heads = 16
    c.mpp = ml_collections.ConfigDict()
    c.mpp.target = "mean_color"  # 'mean_color' (3-bit, 512 classes), 'color_4x4', 'pixels' (L2)
    c.mpp.corrupt_ratio = 0.5  # share of the patches corrupted (and predicted)
    c.mpp.mask_fraction = 0.8  # of those: replaced by the [mask] embedding
    c.mpp.random_fraction = 0.1  # of those: replaced by another patch's embedding (rest kept)
    # Few-shot linear evaluation of the pooled features during training (vit_jax.fewshot): a
    # closed-form ridge on k labelled examples per class of train_split, accuracy on test_split.
    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.every = 0  # every this many steps and at the end (0 = off)
    c.fewshot.dataset = ""  # '' = the run's dataset (labels are read, also by a pretraining run)
    c.fewshot.train_split = ""  # '' = the run's train_split (e.g. 'train[:50000]' to read less)
    c.fewshot.test_split = ""  # '' = the run's test_split
    c.fewshot.shots = (1, 5, 10, 25)  # examples per class
    c.fewshot.seeds = 3  # draws of the examples per k, accuracies averaged
    c.fewshot.l2_reg = 1024.0  # ridge strength (big_vision's 2**10)
    c.seed = 0  # init, dropout and data-order seed
    # Schedule of side work (in steps; 0 = only at the end).
    c.eval_every = 0  # evaluate on test_split every this many steps, and at the end
    c.log_every = 50  # log train loss / lr / grad norm every this many steps
    c.checkpoint_every = 1000  # save a resumable checkpoint every this many steps (and at the end)
    c.keep_checkpoints = 2  # resumable checkpoints kept in <workdir>/checkpoints
    c.keep_best = False  # also keep the best evaluation's params (best_params.npz, best.json)
    # Fine-tuning.
    c.pretrained = ""  # released-format .npz, or a workdir holding params.npz ('' = from scratch)
    c.lock()
    return c
