"""Classification: softmax or sigmoid cross-entropy, label smoothing, mixup, top-1/top-5.

The fine-tuning step with this task is the original vit_jax update (its `train.py`): softmax
cross-entropy on one-hot labels, averaged over the batch; mixup and label smoothing are the
recipes' additions and off by default.
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
MIXUP_STREAM = 1  # fold_in constant separating the mixup key from the dropout key
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
        if not (config.mixup_alpha >= 0.0 and math.isfinite(config.mixup_alpha)):
            raise ValueError(f"mixup_alpha must be ≥ 0 (0 = no mixup), got {config.mixup_alpha}.")

    @classmethod
    def targets_for(cls, config: ml_collections.ConfigDict) -> str:
        return "multi_hot" if config.loss == "sigmoid_xent" else "one_hot"

    def head(self) -> dict[str, Any]:
        return {"num_classes": self.info.num_classes}

    def train_loss(self, apply_fn: ApplyFn, params: Any, batch: Batch, rng: jax.Array) -> jax.Array:
        images, labels = batch["image"], batch["label"]
        if self.config.mixup_alpha > 0:
            mix_key = jax.random.fold_in(rng, MIXUP_STREAM)
            images, labels = mixup(images, labels, mix_key, self.config.mixup_alpha)
        logits = apply_fn({"params": params}, images, train=True, rngs={"dropout": rng})
        return compute_loss(logits, labels, self.config.loss, self.config.label_smoothing).mean()

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
