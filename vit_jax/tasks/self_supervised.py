"""Self-supervised pretraining tasks: MAE ('mae') and the ViT paper's masked patches ('mpp').

Neither reads the labels: the images are the targets. Each wraps the run's ViT, built without a
head and unpooled, in its pretraining model (`vit_jax.models_ssl`), so the saved `params.npz`
holds the ViT under `encoder` beside the objective's own parts; fine-tuning from it loads the
encoder and reports what it leaves (`checkpoint.load_pretrained`), and `encoder.npz` (written
beside it) is the encoder alone in the released layout.

Options: `config.mae` (mask ratio, per-patch normalised targets, decoder size) and
`config.mpp` (corruption ratios, target). Evaluation masks or corrupts the same patches every
time (a fixed key), so its loss is comparable between steps and runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import encoder_tree, models_ssl
from vit_jax.tasks.base import ApplyFn, Batch, Metrics, Task

LABEL_OPTIONS = ("label_smoothing", "mixup_alpha", "cutmix_alpha")
NORM_PIX_EPS = 1e-6  # MAE's per-patch target normalisation: (x − mean) / sqrt(var + eps)


class _Pretraining(Task):
    """What MAE and masked patch prediction share: no labels, a wrapped headless ViT."""

    higher_is_better = False
    best_metric = "loss"
    options_key: ClassVar[str]

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        for key in LABEL_OPTIONS:
            if config[key]:
                raise ValueError(
                    f"{key}={config[key]} mixes or smooths labels, which task={cls.name!r} does "
                    "not read (the images are its targets); set it to 0."
                )
        model = config.model
        if "transformer" not in model or model.get("resnet") is not None:
            raise ValueError(
                f"task={cls.name!r} pretrains a plain ViT encoder; {model.model_name} is not "
                "one (Mixer and hybrid models are not supported). Pick a ViT, e.g. ViT-B_16."
            )
        if model.get("representation_size"):
            raise ValueError(
                f"task={cls.name!r} reads every token of the encoder; representation_size="
                f"{model.representation_size} would put a tanh layer on each. Set "
                "--config.model.representation_size=None."
            )
        if model.get("classifier", "token") != "token":
            raise ValueError(
                f"task={cls.name!r} needs a ViT with a class token (classifier='token'), got "
                f"classifier={model.get('classifier')!r}; fine-tuning may pool otherwise."
            )

    @classmethod
    def targets_for(cls, config: ml_collections.ConfigDict) -> str:
        del config
        return "one_hot"  # read by the pipeline, never by the task

    def head(self) -> dict[str, Any]:
        return {"num_classes": 0, "classifier": "token_unpooled"}

    @property
    def options(self) -> ml_collections.ConfigDict:
        return self.config[self.options_key]

    def metrics(self, sums: Mapping[str, float]) -> Metrics:
        count = sums["count"]
        return {k: v / count for k, v in sums.items() if k != "count"} | {"count": count}

    def inference_info(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "options": self.options.to_dict(),
            "eval_crop": self.config.eval_crop,
            "encoder": encoder_tree.ENCODER_FILE,
        }


def _check_fraction(key: str, value: float, low_open: bool = True) -> None:
    ok = math.isfinite(value) and (0.0 < value < 1.0 if low_open else 0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1]"
        raise ValueError(f"{key} must be in {interval}, got {value}.")


class MaskedAutoencoding(_Pretraining):
    """MAE: MSE between predicted and true pixels of the masked patches only."""

    name = "mae"
    losses = ("mse",)
    options_key = "mae"

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        mae = config.mae
        _check_fraction("mae.mask_ratio", mae.mask_ratio)
        for key in ("decoder_width", "decoder_depth", "decoder_heads"):
            if not isinstance(mae[key], int) or mae[key] < 1:
                raise ValueError(f"mae.{key} must be a positive integer, got {mae[key]!r}.")
        if mae.decoder_width % mae.decoder_heads or mae.decoder_width % 4:
            raise ValueError(
                f"mae.decoder_width={mae.decoder_width} must be divisible by 4 (the sin-cos "
                f"table) and by mae.decoder_heads={mae.decoder_heads}."
            )

    def wrap_model(self, encoder: nn.Module) -> nn.Module:
        mae = self.options
        return models_ssl.MaskedAutoencoder(
            encoder=encoder,
            mask_ratio=mae.mask_ratio,
            decoder_width=mae.decoder_width,
            decoder_depth=mae.decoder_depth,
            decoder_heads=mae.decoder_heads,
        )

    def train_loss(
        self, apply_fn: ApplyFn, params: Any, batch: Batch, rng: jax.Array, inputs: Any = None
    ) -> jax.Array:
        del inputs
        mask_key, dropout_key = jax.random.split(rng)
        outputs = apply_fn(
            {"params": params},
            batch["image"],
            train=True,
            mask_key=mask_key,
            rngs={"dropout": dropout_key},
        )
        return self.reconstruction_loss(batch["image"], *outputs).mean()

    def eval_values(self, apply_fn: ApplyFn, params: Any, batch: Batch) -> dict[str, jax.Array]:
        outputs = apply_fn({"params": params}, batch["image"], train=False)
        return {"loss": self.reconstruction_loss(batch["image"], *outputs)}

    def patch_size(self) -> int:
        return int(self.config.model.patches.size[0])

    def pixel_targets(self, images: jax.Array) -> jax.Array:
        """Each patch's pixels, normalised per patch when `mae.norm_pix_loss` (MAE's default)."""
        target = models_ssl.patchify(images.astype(jnp.float32), self.patch_size())
        if self.options.norm_pix_loss:
            mean = target.mean(axis=-1, keepdims=True)
            var = target.var(axis=-1, keepdims=True, ddof=1)  # unbiased, as MAE (torch.var)
            target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
        return target

    def reconstruction_loss(
        self, images: jax.Array, predicted: jax.Array, mask: jax.Array
    ) -> jax.Array:
        """Per-example MSE over the masked patches' pixels [n] (visible patches count 0)."""
        per_patch = jnp.mean((predicted - self.pixel_targets(images)) ** 2, axis=-1)
        return jnp.sum(per_patch * mask, axis=1) / jnp.sum(mask, axis=1)

    def picture(self, apply_fn: ApplyFn, params: Any, images: jax.Array) -> jax.Array:
        """One row per image: original | masked (hidden patches grey) | reconstruction (the
        predicted masked patches pasted among the visible ones)."""
        predicted, mask = apply_fn({"params": params}, images, train=False)
        patch = self.patch_size()
        target = models_ssl.patchify(images.astype(jnp.float32), patch)
        if self.options.norm_pix_loss:  # back to pixels with each true patch's mean and std
            mean = target.mean(axis=-1, keepdims=True)
            std = jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
            predicted = predicted * std + mean
        grid = (images.shape[1] // patch, images.shape[2] // patch)
        hidden = mask[..., None]
        masked = models_ssl.unpatchify(target * (1 - hidden), patch, grid)
        pasted = models_ssl.unpatchify(target * (1 - hidden) + predicted * hidden, patch, grid)
        rows = jnp.concatenate([images, masked, pasted], axis=2)  # [n, H, 3W, 3]
        rows = rows.reshape(-1, *rows.shape[2:])
        return jnp.clip((rows + 1.0) * 127.5, 0, 255).astype(jnp.uint8)

    @classmethod
    def summary(cls, config: ml_collections.ConfigDict, metrics: Mapping[str, float]) -> str:
        return (
            f"final {config.test_split} reconstruction loss {metrics['loss']:.4f} (masked "
            f"patches, {int(metrics['count'])} examples)"
        )


class MaskedPatchPrediction(_Pretraining):
    """The ViT paper's masked patch prediction: a target per corrupted patch."""

    name = "mpp"
    losses = ("softmax_xent", "mse")
    options_key = "mpp"

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        mpp = config.mpp
        if mpp.target not in models_ssl.MPP_TARGETS:
            raise ValueError(
                f"Unknown mpp.target={mpp.target!r}; valid values: "
                f"{', '.join(models_ssl.MPP_TARGETS)}."
            )
        wanted = "mse" if mpp.target == "pixels" else "softmax_xent"
        if config.loss != wanted:
            raise ValueError(
                f"mpp.target={mpp.target!r} is learnt with loss={wanted!r}, got "
                f"loss={config.loss!r}; set --config.loss={wanted}."
            )
        _check_fraction("mpp.corrupt_ratio", mpp.corrupt_ratio)
        _check_fraction("mpp.mask_fraction", mpp.mask_fraction, low_open=False)
        _check_fraction("mpp.random_fraction", mpp.random_fraction, low_open=False)
        if mpp.mask_fraction + mpp.random_fraction > 1.0:
            raise ValueError(
                f"mpp.mask_fraction + mpp.random_fraction = "
                f"{mpp.mask_fraction + mpp.random_fraction} must be ≤ 1 (the rest stay as "
                "they are)."
            )
        patch = config.model.patches.size[0]
        if mpp.target == "color_4x4" and patch % 4:
            raise ValueError(
                f"mpp.target='color_4x4' needs a patch size divisible by 4, got {patch}."
            )

    def cells(self) -> int:
        return math.isqrt(models_ssl.MPP_TARGETS[self.options.target])

    def wrap_model(self, encoder: nn.Module) -> nn.Module:
        patch = self.config.model.patches.size
        outputs = (
            patch[0] * patch[1] * 3
            if self.options.target == "pixels"
            else models_ssl.COLORS * self.cells() ** 2
        )
        return models_ssl.MaskedPatchPredictor(
            encoder=encoder,
            outputs=outputs,
            corrupt_ratio=self.options.corrupt_ratio,
            mask_fraction=self.options.mask_fraction,
            random_fraction=self.options.random_fraction,
        )

    def train_loss(
        self, apply_fn: ApplyFn, params: Any, batch: Batch, rng: jax.Array, inputs: Any = None
    ) -> jax.Array:
        del inputs
        corruption_key, dropout_key = jax.random.split(rng)
        outputs, corrupted = apply_fn(
            {"params": params},
            batch["image"],
            train=True,
            corruption_key=corruption_key,
            rngs={"dropout": dropout_key},
        )
        return self.patch_losses(batch["image"], outputs, corrupted)["loss"].mean()

    def eval_values(self, apply_fn: ApplyFn, params: Any, batch: Batch) -> dict[str, jax.Array]:
        outputs, corrupted = apply_fn({"params": params}, batch["image"], train=False)
        return self.patch_losses(batch["image"], outputs, corrupted)

    def patch_losses(
        self, images: jax.Array, outputs: jax.Array, corrupted: jax.Array
    ) -> dict[str, jax.Array]:
        """Per-example loss (and colour accuracy) over the corrupted patches [n]."""
        patch = int(self.config.model.patches.size[0])
        count = jnp.sum(corrupted, axis=1)
        if self.options.target == "pixels":
            target = models_ssl.patchify(images.astype(jnp.float32), patch)
            per_patch = jnp.mean((outputs - target) ** 2, axis=-1)
            return {"loss": jnp.sum(per_patch * corrupted, axis=1) / count}
        cells = self.cells()
        target = models_ssl.color_targets(images, patch, cells)  # [n, N, cells²]
        logits = outputs.reshape(*target.shape, models_ssl.COLORS)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean(axis=-1)
        hits = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32).mean(axis=-1)
        return {
            "loss": jnp.sum(xent * corrupted, axis=1) / count,
            "color_accuracy": jnp.sum(hits * corrupted, axis=1) / count,
        }

    @classmethod
    def summary(cls, config: ml_collections.ConfigDict, metrics: Mapping[str, float]) -> str:
        accuracy = metrics.get("color_accuracy")
        extra = "" if accuracy is None else f", colour accuracy {accuracy:.4f}"
        return (
            f"final {config.test_split} masked-patch loss {metrics['loss']:.4f}{extra} "
            f"(corrupted patches, {int(metrics['count'])} examples)"
        )
