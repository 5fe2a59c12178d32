"""Attention rollout (Abnar & Zuidema, 2020) and its picture over the image.

    python -m vit_jax.attention --checkpoint=ViT-B_16.npz --model=ViT-B_16 --out=map.png IMAGE

This module owns: reading every block's attention weights from a ViT's named intermediates
(`attention_weights`), the rollout of those weights through the layers (`attention_rollout`),
the map of what the pooled output attends to over the patch grid (`cls_attention_map`), and
the overlay of that map on the image (`overlay`, `save_overlay`, a PNG written with Pillow). It
does not own the model, the checkpoint loading (`vit_jax.predict.load_for_prediction`), the
preprocessing (`vit_jax.predict.load_image`, i.e. `input_pipeline.eval_image`) or the decoding
of the image file (`vit_jax.image_folder.read_image`, for the model's input and the overlay's
picture alike, so both show the pixels an evaluation of that file would see).

Rollout, for weights A_l of shape [batch, heads, tokens, tokens] (rows: queries, each summing
to 1): average the heads, add the identity for the residual connection, divide every row by its
sum (Ã_l = (mean_h A_l + I) / 2 for row-stochastic A_l), and multiply over the layers in order,
the last layer on the left: R = Ã_L ⋯ Ã_2 · Ã_1. Row i of R is how much each input token
contributes to output token i; every row sums to 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from vit_jax import native_notices  # isort: skip  (before jax: its native log level)

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

with native_notices.hidden_for_command(__name__):  # these import TensorFlow
    from vit_jax import image_folder, models_vit, predict

_ATTENTION = "MultiHeadDotProductAttention_0"


# ----------------------------------------------------------------------------------------------
# Public interface.


def attention_weights(
    model: nn.Module, params: Mapping[str, Any], images: np.ndarray | jax.Array
) -> list[np.ndarray]:
    """Every encoder block's attention weights [batch, heads, tokens, tokens], first block first.

    Read from the model's named intermediates (`mutable=['intermediates']`), which carry the
    weights with the default `attention_impl='flax'`; scanned and unrolled encoders alike.
    """
    if not isinstance(model, models_vit.VisionTransformer):
        raise ValueError(
            f"Attention maps are for ViT and DeiT models (the rollout of their encoder's "
            f"attention weights); got a {type(model).__name__}. Use a ViT or DeiT model."
        )
    if model.attention_impl != "flax":
        raise ValueError(
            f"attention_impl={model.attention_impl!r} does not expose attention weights (the "
            "fused kernels never form them); build the model with attention_impl='flax'."
        )

    @jax.jit
    def run(params, images):
        _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
        return state["intermediates"]["Transformer"]

    blocks = jax.device_get(run(params, np.asarray(images, np.float32)))
    if "encoderblock" in blocks:  # scan=True: one entry with a leading layer axis
        return list(blocks["encoderblock"][_ATTENTION]["attention_weights"][0])
    indices = sorted(int(k.rsplit("_", 1)[1]) for k in blocks if k.startswith("encoderblock_"))
    return [blocks[f"encoderblock_{i}"][_ATTENTION]["attention_weights"][0] for i in indices]


def attention_rollout(weights: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Rollout [batch, tokens, tokens] (float64) of per-layer weights, first layer first.

    `weights` is a list of arrays [batch, heads, tokens, tokens] (as `attention_weights` returns)
    or one array [layers, batch, heads, tokens, tokens]. See the module docstring for the maths.
    """
    layers = list(weights)
    if not layers:
        raise ValueError("attention_rollout needs the weights of at least one layer.")
    rollout = None
    for index, layer in enumerate(layers):
        layer = np.asarray(layer, np.float64)
        if layer.ndim != 4 or layer.shape[-1] != layer.shape[-2]:
            raise ValueError(
                f"Layer {index}: attention weights must be [batch, heads, tokens, tokens], got "
                f"shape {layer.shape}."
            )
        if rollout is not None and layer.shape[-1] != rollout.shape[-1]:
            raise ValueError(
                f"Layer {index} has {layer.shape[-1]} tokens, the layers before it "
                f"{rollout.shape[-1]}."
            )
        fused = layer.mean(axis=1) + np.eye(layer.shape[-1])
        fused /= fused.sum(axis=-1, keepdims=True)
        rollout = fused if rollout is None else fused @ rollout
    return rollout


def cls_attention_map(
    rollout: np.ndarray, grid_shape: tuple[int, int], *, has_class_token: bool | int = True
) -> np.ndarray:
    """What the pooled output draws from each patch: [batch, grid_h, grid_w].

    With a class token (classifier 'token'), the class token's row of the rollout without its
    own column. Without one (classifier 'gap', whose output is the mean of the tokens), the mean
    of all tokens' rows. A distilled model (DeiT) has two leading special tokens, class and
    distillation, whose two heads are averaged: pass `has_class_token=2` to get the mean of
    their two rows, without the special columns. The values are the rollout's (not rescaled).
    """
    rollout = np.asarray(rollout)
    if rollout.ndim != 3 or rollout.shape[1] != rollout.shape[2]:
        raise ValueError(f"Rollout must be [batch, tokens, tokens], got {rollout.shape}.")
    rows, cols = (int(d) for d in grid_shape)
    special = int(has_class_token)
    patches = rollout.shape[-1] - special
    if rows * cols != patches:
        raise ValueError(
            f"Grid {rows}×{cols} has {rows * cols} patches, but the rollout has {patches} patch "
            f"tokens ({rollout.shape[-1]} tokens, class token: {has_class_token})."
        )
    if special:
        pooled = rollout[:, 0, special:] if special == 1 else rollout[:, :special, special:]
        pooled = pooled if special == 1 else pooled.mean(axis=1)
    else:
        pooled = rollout.mean(axis=1)
    return pooled.reshape(rollout.shape[0], rows, cols)


def grid_shape(model: nn.Module, image_size: int) -> tuple[int, int]:
    """The patch grid of a ViT at a square `image_size` (the hybrid stem's stride included)."""
    stride = models_vit.stem_stride(model.resnet)
    patch_h, patch_w = model.patch_size
    return image_size // (patch_h * stride), image_size // (patch_w * stride)


def overlay(image: Any, attention_map: np.ndarray, *, alpha: float = 0.6) -> Image.Image:
    """The map, rescaled to [0, 1] and upsampled (bilinear), over the image as a heat colour.

    `image` is a PIL image, a uint8 array [H, W, 3] or a float array in [-1, 1] (as the
    model sees it); the result is an RGB image of the same size.
    """
    base = _as_rgb_array(image)
    values = np.asarray(attention_map, np.float64)
    if values.ndim != 2:
        raise ValueError(f"The attention map must be [rows, cols], got shape {values.shape}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    low, high = values.min(), values.max()
    values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    height, width = base.shape[:2]
    small = Image.fromarray(values.astype(np.float32))  # mode "F"
    upsampled = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))
    upsampled = np.clip(upsampled, 0.0, 1.0)[..., None]
    heat = np.clip(3.0 * upsampled - np.array([0.0, 1.0, 2.0]), 0.0, 1.0) * 255.0  # "hot" map
    blended = (1.0 - alpha) * base + alpha * heat
    return Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))


def save_overlay(
    path: str | os.PathLike, image: Any, attention_map: np.ndarray, *, alpha: float = 0.6
) -> Image.Image:
    """Writes `overlay(image, attention_map)` as a PNG at `path`; returns the image."""
    picture = overlay(image, attention_map, alpha=alpha)
    picture.save(os.fspath(path), format="PNG")
    return picture


# ----------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vit_jax.attention",
        description="Attention-rollout map of one image, over the image, as a PNG.",
    )
    parser.add_argument("--checkpoint", required=True, help="Released .npz or training workdir.")
    parser.add_argument("--model", required=True, help="Zoo model name, e.g. ViT-B_16.")
    parser.add_argument("--out", required=True, help="PNG file to write.")
    parser.add_argument("--image_size", type=int, help="Default: the checkpoint's resolution.")
    parser.add_argument(
        "--overrides", type=predict.parse_overrides, default={}, help="Model overrides (JSON)."
    )
    parser.add_argument("--alpha", type=float, default=0.6, help="Opacity of the map.")
    parser.add_argument("image", metavar="IMAGE", help="Image file.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vit_jax.attention`: the rollout map of one image written as a PNG."""
    args = build_parser().parse_args(argv)
    try:
        model, params, size = predict.load_for_prediction(
            args.checkpoint, args.model, image_size=args.image_size, **args.overrides
        )
        pixels = predict.load_image(args.image, size)  # eval preprocessing ('resize')
        rollout = attention_rollout(attention_weights(model, params, pixels[None]))
        # The class token, and a distilled model's distillation token after it.
        has_class_token = int(model.classifier == "token") + int(model.distilled)
        heat = cls_attention_map(rollout, grid_shape(model, size), has_class_token=has_class_token)
        original = image_folder.read_image(args.image)  # decoded as load_image decodes it
        save_overlay(args.out, original, heat[0], alpha=args.alpha)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


# ----------------------------------------------------------------------------------------------
# Helpers.


def _as_rgb_array(image: Any) -> np.ndarray:
    """float64 [H, W, 3] in [0, 255] from a PIL image, uint8 array or [-1, 1] float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float64)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"The image must be [H, W, 3], got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, -1.0, 1.0).astype(np.float64) + 1.0) * 127.5
    return array.astype(np.float64)


if __name__ == "__main__":
    sys.exit(main())
