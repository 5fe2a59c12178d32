"""Classification: softmax or sigmoid cross-entropy, label smoothing, mixup/cutmix, top-1/top-5.

The fine-tuning step with this task is the original vit_jax update (its `train.py`): softmax
cross-entropy on one-hot labels, averaged over the batch; mixup, cutmix and label smoothing are
the recipes' additions (DeiT's) and off by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax.tasks.base import ApplyFn, Batch, Metrics, Task

LOSSES = ("softmax_xent", "sigmoid_xent")
MIXUP_STREAM = 1  # fold_in constant separating the mixup/cutmix key from the dropout key
MIX_SWITCH_PROB = 0.5  # with both mixup and cutmix on: the share of batches cut-mixed (timm's)
TOP_K = 5


class Classification(Task):
    """One label (softmax) or several (sigmoid, multi-hot) per image, from a class-labelled set."""

    name = "classification"
    losses = LOSSES
    best_metric = "accuracy"
    higher_is_better = True

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        if config.label_smoothing and config.loss != "softmax_xent":
            raise ValueError("label_smoothing applies to loss='softmax_xent' only.")
        if not 0.0 <= config.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}.")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if not (config[key] >= 0.0 and math.isfinite(config[key])):
                raise ValueError(f"{key} must be ≥ 0 (0 = off), got {config[key]}.")

    @classmethod
    def targets_for(cls, config: ml_collections.ConfigDict) -> str:
        return "multi_hot" if config.loss == "sigmoid_xent" else "one_hot"

    def head(self) -> dict[str, Any]:
        return {"num_classes": self.info.num_classes}

    def train_loss(
        self, apply_fn: ApplyFn, params: Any, batch: Batch, rng: jax.Array, inputs: Any = None
    ) -> jax.Array:
        del inputs
        images, labels = self.augment(batch["image"], batch["label"], rng)
        logits = apply_fn({"params": params}, images, train=True, rngs={"dropout": rng})
        return compute_loss(logits, labels, self.config.loss, self.config.label_smoothing).mean()

    def augment(
        self, images: jax.Array, labels: jax.Array, rng: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Mixup and/or cutmix of one micro-batch (as configured; with both, one per batch)."""
        mixup_alpha, cutmix_alpha = self.config.mixup_alpha, self.config.cutmix_alpha
        if not (mixup_alpha or cutmix_alpha):
            return images, labels
        mix_key, cut_key, switch_key = jax.random.split(jax.random.fold_in(rng, MIXUP_STREAM), 3)
        if not cutmix_alpha:
            return mixup(images, labels, mix_key, mixup_alpha)
        if not mixup_alpha:
            return cutmix(images, labels, cut_key, cutmix_alpha)
        use_cutmix = jax.random.bernoulli(switch_key, MIX_SWITCH_PROB)
        return jax.tree.map(
            lambda a, b: jnp.where(use_cutmix, a, b),
            cutmix(images, labels, cut_key, cutmix_alpha),
            mixup(images, labels, mix_key, mixup_alpha),
        )

    def eval_values(self, apply_fn: ApplyFn, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Top-1/top-5 hits and the (unsmoothed) loss; a hit is a top class among the labels."""
        logits = apply_fn({"params": params}, batch["image"], train=False)
        labels = batch["label"]
        top = jax.lax.top_k(logits, min(TOP_K, logits.shape[-1]))[1]
        hits = jnp.take_along_axis(labels, top, axis=-1) > 0
        return {
            "correct_top1": hits[:, 0].astype(jnp.float32),
            "correct_top5": jnp.any(hits, axis=-1).astype(jnp.float32),
            "loss": compute_loss(logits, labels, self.config.loss),
        }

    def metrics(self, sums: Mapping[str, float]) -> Metrics:
        count = sums["count"]
        return {
            "accuracy": sums["correct_top1"] / count,
            "accuracy_top5": sums["correct_top5"] / count,
            "loss": sums["loss"] / count,
            "count": count,
        }

    @classmethod
    def summary(cls, config: ml_collections.ConfigDict, metrics: Mapping[str, float]) -> str:
        del config
        return (
            f"final test accuracy {metrics['accuracy']:.4f} (top-5 "
            f"{metrics['accuracy_top5']:.4f}, loss {metrics['loss']:.4f}, "
            f"{int(metrics['count'])} examples)"
        )

    def inference_info(self) -> dict[str, Any]:
        names = self.info.class_names
        return {
            "task": self.name,
            "loss": self.config.loss,
            "class_names": list(names) if names else None,
            "eval_crop": self.config.eval_crop,
        }


def compute_loss(
    logits: jax.Array, labels: jax.Array, loss_name: str, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example loss: softmax cross-entropy (optionally smoothed) or summed sigmoid xent."""
    if loss_name == "softmax_xent":
        if label_smoothing:
            labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
        return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)
    if loss_name == "sigmoid_xent":
        return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)
    raise ValueError(f"Unknown loss {loss_name!r}; valid values: {LOSSES}.")


def mixup(
    images: jax.Array, labels: jax.Array, key: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Mixes the batch with itself reversed: λ·x + (1-λ)·x[::-1], one λ ~ Beta(α, α).

    Images and labels get the same λ, so one-hot labels stay distributions (sum 1).
    """
    lam = jax.random.beta(key, alpha, alpha).astype(images.dtype)

    def mix(x):
        return lam * x + (1.0 - lam) * jnp.flip(x, axis=0)

    return mix(images), mix(labels).astype(labels.dtype)


def cutmix(
    images: jax.Array, labels: jax.Array, key: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Pastes a box of the batch reversed into each image; labels mixed by the kept area.

    λ ~ Beta(α, α) sets the box's side ratio √(1-λ) (one box for the batch, as timm's batch
    mode); its centre is uniform over the image and the box is clipped to it, so the label
    weight is the area actually kept, 1 - box/image, not the drawn λ.
    """
    lam_key, y_key, x_key = jax.random.split(key, 3)
    lam = jax.random.beta(lam_key, alpha, alpha)
    height, width = images.shape[1:3]
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = jnp.floor(height * ratio), jnp.floor(width * ratio)
    cy = jax.random.randint(y_key, (), 0, height).astype(jnp.float32)
    cx = jax.random.randint(x_key, (), 0, width).astype(jnp.float32)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [height, width]
    mixed = jnp.where(box[None, :, :, None], jnp.flip(images, axis=0), images)
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    mixed_labels = kept * labels + (1.0 - kept) * jnp.flip(labels, axis=0)
    return mixed, mixed_labels.astype(labels.dtype)
