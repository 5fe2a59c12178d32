"""Regression: one or more real-valued targets per image, RMSE and MAE in the target's units.

The reference case is the PetFinder "Pawpularity" competition (one target, 1–100, metric RMSE).
Two losses:
- `mse`: squared error on the target standardised with the training split's mean and standard
  deviation (the head starts at the mean; the loss is the MSE in target units divided by the
  variance, so one learning rate fits targets of any scale);
- `sigmoid_bce`: the competition's trick: a sigmoid output trained with binary cross-entropy
  against the target scaled to [0, 1] by `regression.target_range` (Pawpularity: (0, 100)), or
  by the training split's min and max when the range is not given.
Predictions are always reported in target units: `offset + scale · f(output)`, f the identity
(`mse`) or the sigmoid (`sigmoid_bce`); `predict` reads offset, scale and f from `task.json`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax.csv_dataset import CSV_PREFIX
from vit_jax.tasks.base import ApplyFn, Batch, Metrics, Task

LOSSES = ("mse", "sigmoid_bce")


class Regression(Task):
    """Real-valued targets ('target' [T]): CSV columns, or a labelled set's numeric class names."""

    name = "regression"
    losses = LOSSES
    best_metric = "rmse"
    higher_is_better = False

    def __init__(self, config: ml_collections.ConfigDict, info: Any):
        super().__init__(config, info)
        stats = info.target_stats
        self.target_names = tuple(info.target_names)
        if config.loss == "mse":
            self.offset = tuple(float(m) for m in stats["mean"])
            self.scale = tuple(float(s) if s > 0 else 1.0 for s in stats["std"])
        else:
            lo, hi = _target_range(config, stats)
            self.offset = tuple(lo)
            self.scale = tuple(h - low for low, h in zip(lo, hi, strict=True))
        self.use_features = bool(info.num_features)

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        for key in ("label_smoothing", "mixup_alpha", "cutmix_alpha"):
            if config[key]:
                raise ValueError(
                    f"{key}={config[key]} is a classification option; set it to 0 for "
                    "task='regression'."
                )
        if config.csv.feature_columns and not config.dataset.startswith(CSV_PREFIX):
            raise ValueError(
                f"csv.feature_columns={tuple(config.csv.feature_columns)} needs a "
                f"'{CSV_PREFIX}' dataset (got dataset={config.dataset!r}); unset it or read "
                "the images and their columns from a CSV."
            )
        target_range = tuple(config.regression.target_range)
        if target_range:
            numbers = all(isinstance(v, int | float) and math.isfinite(v) for v in target_range)
            if len(target_range) != 2 or not numbers or target_range[0] >= target_range[1]:
                raise ValueError(
                    f"regression.target_range={target_range} must be (low, high) with "
                    "low < high, e.g. (0, 100) for Pawpularity; () takes the training split's "
                    "min and max."
                )

    @classmethod
    def targets_for(cls, config: ml_collections.ConfigDict) -> str:
        del config
        return "value"

    def head(self) -> dict[str, Any]:
        bias = 0.0  # mse: the standardised target's mean
        if self.config.loss == "sigmoid_bce":  # start at the mean scaled target
            mean = np.asarray(self.info.target_stats["mean"], np.float64)
            scaled = (mean - np.asarray(self.offset)) / np.asarray(self.scale)
            p = float(np.clip(np.mean(scaled), 1e-3, 1 - 1e-3))
            bias = math.log(p / (1 - p))
        return {"num_classes": len(self.target_names), "head_bias_init": bias}

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array]:
        return {"features": batch["features"]} if self.use_features else {}

    def train_loss(
        self, apply_fn: ApplyFn, params: Any, batch: Batch, rng: jax.Array, inputs: Any = None
    ) -> jax.Array:
        del inputs
        outputs = apply_fn(
            {"params": params},
            batch["image"],
            train=True,
            rngs={"dropout": rng},
            **self.model_inputs(batch),
        )
        return self._loss(outputs, batch["target"]).mean()

    def eval_values(self, apply_fn: ApplyFn, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Squared and absolute errors in target units (summed over targets) and the loss."""
        outputs = apply_fn(
            {"params": params}, batch["image"], train=False, **self.model_inputs(batch)
        )
        error = self.predictions(outputs) - batch["target"]
        values = {
            "squared_error": jnp.sum(error**2, axis=-1),
            "absolute_error": jnp.sum(jnp.abs(error), axis=-1),
            "loss": self._loss(outputs, batch["target"]),
        }
        if len(self.target_names) > 1:
            for i, name in enumerate(self.target_names):
                values[f"squared_error/{name}"] = error[:, i] ** 2
        return values

    def metrics(self, sums: Mapping[str, float]) -> Metrics:
        count, targets = sums["count"], len(self.target_names)
        metrics = {
            "rmse": math.sqrt(sums["squared_error"] / (count * targets)),
            "mae": sums["absolute_error"] / (count * targets),
            "loss": sums["loss"] / count,
            "count": count,
        }
        if targets > 1:
            for name in self.target_names:
                metrics[f"rmse/{name}"] = math.sqrt(sums[f"squared_error/{name}"] / count)
        return metrics

    @classmethod
    def summary(cls, config: ml_collections.ConfigDict, metrics: Mapping[str, float]) -> str:
        return (
            f"final {config.test_split} RMSE {metrics['rmse']:.4f} (MAE {metrics['mae']:.4f}, "
            f"loss {metrics['loss']:.4f}, {int(metrics['count'])} examples)"
        )

    def inference_info(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "loss": self.config.loss,
            "target_names": list(self.target_names),
            "offset": list(self.offset),
            "scale": list(self.scale),
            "output": "sigmoid" if self.config.loss == "sigmoid_bce" else "identity",
            "eval_crop": self.config.eval_crop,
            "num_features": int(self.info.num_features),
            "id_column": self.config.csv.id_column,
            "feature_columns": list(self.config.csv.feature_columns) if self.use_features else [],
        }

    def predictions(self, outputs: jax.Array) -> jax.Array:
        """Model outputs → targets in their own units."""
        return to_values(outputs, self.inference_info())

    def _loss(self, outputs: jax.Array, target: jax.Array) -> jax.Array:
        """Per-example loss, averaged over the targets."""
        offset, scale = jnp.asarray(self.offset), jnp.asarray(self.scale)
        scaled = (target - offset) / scale
        if self.config.loss == "mse":
            return jnp.mean((outputs - scaled) ** 2, axis=-1)
        scaled = jnp.clip(scaled, 0.0, 1.0)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs, scaled), axis=-1)


def to_values(outputs: Any, info: Mapping[str, Any]) -> Any:
    """Model outputs → predictions in target units, from a regression `inference_info`.

    Works on jax and NumPy arrays alike (`predict` calls it on NumPy logits).
    """
    xp = jnp if isinstance(outputs, jax.Array) else np
    offset, scale = xp.asarray(info["offset"]), xp.asarray(info["scale"])
    if info["output"] == "sigmoid":
        outputs = 1.0 / (1.0 + xp.exp(-outputs))
    return offset + scale * outputs


def _target_range(
    config: ml_collections.ConfigDict, stats: Mapping[str, Any]
) -> tuple[list[float], list[float]]:
    """(low, high) per target: `regression.target_range` for every target, else the data's."""
    given = tuple(config.regression.target_range)
    count = len(stats["min"])
    if given:
        return [float(given[0])] * count, [float(given[1])] * count
    lo, hi = [float(v) for v in stats["min"]], [float(v) for v in stats["max"]]
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        if not a < b:
            raise ValueError(
                f"Target {i} takes one value ({a}) in the training split, so sigmoid_bce cannot "
                "scale it; set regression.target_range=(low, high) or use loss='mse'."
            )
    return lo, hi
