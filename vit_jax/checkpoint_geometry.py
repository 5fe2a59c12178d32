"""What a checkpoint's array shapes say about the model it was trained as.

This module owns reading a checkpoint's geometry from its shapes alone (so `jax.eval_shape`
trees work too): the class count of its head (`head_size`), its patch grid (`checkpoint_grid`:
the position table's, or a Mixer's token-mixing width), the input resolution that grid and the
model's patches give (`infer_image_size`), and resampling the position table to another grid
(`resample_position_table`, as fine-tuning does), and with them the fitting of a checkpoint to
a zoo model (`model_for_checkpoint`), which `predict` and distillation's teacher use. It does
not own the checkpoint format or the resampling itself
(`vit_jax.checkpoint`), nor the models (`vit_jax.models_vit`, `vit_jax.models_mixer`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import (
    checkpoint,
    encoder_tree,
    model_heads,
    models,
    models_beit,
    models_mixer,
    models_swin,
    models_vit,
    relative_positions,
)

Params = dict[str, Any]
# The resolution a Swin or BEiT checkpoint is used at when none is given (their tables record
# a window or grid, not a position table).
RELATIVE_FAMILIES = {
    models.SwinTransformer: models_swin.checkpoint_image_size,
    models.Beit: models_beit.checkpoint_image_size,
}


def refuse_pretraining_tree(params: Mapping[str, Any]) -> None:
    """ValueError for a self-supervised pretraining run's params, saying what to use instead."""
    if encoder_tree.is_pretraining_tree(params):
        raise ValueError(
            f"These params are a self-supervised pretraining run's (its encoder beside "
            f"{sorted(set(params) - {encoder_tree.ENCODER})}); they have no head to predict "
            "with. Fine-tune them first (--config.pretrained=<the run's workdir>) and use the "
            f"fine-tuned run; the encoder alone is the run's {encoder_tree.ENCODER_FILE}."
        )


def head_size(params: Mapping[str, Any]) -> int:
    """Number of classes of the checkpoint's `head`; an error for a head-less checkpoint."""
    refuse_pretraining_tree(params)
    head = params.get("head")
    if not isinstance(head, Mapping) or "kernel" not in head:
        raise checkpoint.CheckpointError(
            "The checkpoint has no classification head (`head/kernel`): it holds features only "
            f"(top-level keys: {sorted(params)}). Prediction needs a checkpoint with a head, "
            "e.g. a fine-tuned one or an ImageNet-21k pretrained one."
        )
    return int(np.shape(head["kernel"])[-1])


def infer_image_size(
    params: Mapping[str, Any],
    model: nn.Module,
    *,
    grid_shape: Sequence[int] | None = None,
) -> int:
    """The square input resolution the checkpoint was trained at.

    ViT: the position table's grid (rows without the class row when the checkpoint has `cls`,
    and without the distillation row when it has `dist_token`)
    × patch size × the hybrid stem's stride. Mixer: the token-mixing width (= number of patches)
    × patch size. Only array shapes are read, so `jax.eval_shape` trees work too. A grid that
    no square image gives needs `grid_shape=(rows, cols)` (a checkpoint does not record it),
    and the image it gives must be square; otherwise the error says which options to pass.
    """
    rows, cols = checkpoint_grid(params, model, grid_shape)
    (patch_h, patch_w), stride = patch_and_stride(model)
    height, width = rows * patch_h * stride, cols * patch_w * stride
    if height != width:
        fixed = (
            " (a Mixer's token mixing fixes its number of patches, so only a resolution with "
            f"{rows * cols} patches fits it)"
            if isinstance(model, models_mixer.MlpMixer)
            else ""
        )
        raise checkpoint.CheckpointError(
            f"The checkpoint's {rows}×{cols} grid of {patch_h}×{patch_w} px patches (stem stride "
            f"{stride}) is a {height}×{width} px image, not a square one; prediction uses "
            f"square images, so pass the resolution to predict at (--image_size / "
            f"image_size=){fixed}."
        )
    return height


def _shape(params: Mapping[str, Any], path: tuple[str, ...]) -> tuple[int, ...]:
    node: Any = params
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise checkpoint.CheckpointError(
                f"The checkpoint has no {'/'.join(path)}; is it a checkpoint of this model "
                f"family? (top-level keys: {sorted(params)})"
            )
        node = node[part]
    return tuple(np.shape(node))


def patch_and_stride(model: nn.Module) -> tuple[tuple[int, int], int]:
    """((patch rows, patch cols) in px, the hybrid stem's stride) of a ViT or Mixer."""
    if isinstance(model, models_mixer.MlpMixer):
        patch_h, patch_w = (int(d) for d in model.patches["size"])
        return (patch_h, patch_w), 1
    patch_h, patch_w = model.patch_size
    return (int(patch_h), int(patch_w)), models_vit.stem_stride(model.resnet)


def checkpoint_grid(
    params: Mapping[str, Any],
    model: nn.Module,
    grid_shape: Sequence[int] | None = None,
    *,
    image_size_given: bool = False,
) -> tuple[int, int]:
    """(rows, cols) of the checkpoint's patch grid: `grid_shape` (checked), or else the grid
    of a square image (the square grid for square patches).

    Any other token count has several grids (6: 1×6, 2×3, 3×2, 6×1) and a checkpoint does not
    say which; the error then names the option that does.
    """
    if isinstance(model, models_mixer.MlpMixer):
        tokens = _shape(params, ("MixerBlock_0", "token_mixing", "Dense_0", "kernel"))[0]
        what = "Mixer token-mixing"
    else:
        tokens = _shape(params, ("Transformer", "posembed_input", "pos_embedding"))[1]
        tokens -= checkpoint.special_rows(params)  # class and distillation token rows
        what = "position"
    option = "checkpoint_grid_shape=(rows, cols)"
    flag = "--overrides='{\"checkpoint_grid_shape\": [rows, cols]}'"
    if grid_shape is not None:
        dims = tuple(grid_shape)
        integers = all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims)
        if len(dims) != 2 or not integers or min(dims) <= 0:
            raise ValueError(f"{option} must be two positive integers, got {grid_shape!r}.")
        rows, cols = int(dims[0]), int(dims[1])
        if rows * cols != tokens:
            raise checkpoint.CheckpointError(
                f"checkpoint_grid_shape={(rows, cols)} has {rows * cols} cells, but the "
                f"checkpoint's {what} table has {tokens} grid tokens (special rows excluded)."
            )
        return rows, cols
    # The grid of a square image: rows × patch_h = cols × patch_w, rows × cols = tokens.
    (patch_h, patch_w), _ = patch_and_stride(model)
    rows = math.isqrt(tokens * patch_w // patch_h)
    if rows and rows * rows * patch_h == tokens * patch_w and tokens % rows == 0:
        return rows, tokens // rows
    grids = [f"{r}×{tokens // r}" for r in range(1, tokens + 1) if tokens % r == 0]
    shown = ", ".join(grids[:8]) + (", ..." if len(grids) > 8 else "")
    size = ", and the square resolution to predict at (--image_size / image_size=)"
    size = "" if image_size_given else size
    raise checkpoint.CheckpointError(
        f"The checkpoint's {what} table has {tokens} grid tokens (special rows excluded), which is "
        f"not the grid of a square image of {patch_h}×{patch_w} px patches, and a checkpoint "
        f"does not record its grid ({shown} all have {tokens}). Pass the grid it was trained "
        f"at as {option} (command line: {flag}){size}."
    )


def resample_position_table(
    params: Params,
    expected: Mapping[str, Any],
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
) -> Params:
    """The position table resampled from `old_grid` to the grid of `expected`, `new_grid`.

    As fine-tuning does (`checkpoint.interpolate_posembed`); both grids are (rows, cols).
    """
    old = params["Transformer"]["posembed_input"]["pos_embedding"]
    new_shape = expected["Transformer"]["posembed_input"]["pos_embedding"].shape
    resampled = checkpoint.interpolate_posembed(
        old,
        new_shape[1],
        checkpoint.special_rows(params),
        new_has_class_token=checkpoint.special_rows(expected),
        old_grid_shape=old_grid,
        new_grid_shape=new_grid,
    )
    transformer = dict(params["Transformer"])
    transformer["posembed_input"] = {**transformer["posembed_input"], "pos_embedding": resampled}
    return {**params, "Transformer": transformer}


def model_for_checkpoint(
    params: Mapping[str, Any],
    model_name: str,
    *,
    image_size: int | None = None,
    checkpoint_grid_shape: Sequence[int] | None = None,
    num_features: int = 0,
    **overrides: Any,
) -> tuple[nn.Module, Params, int]:
    """Builds zoo model `model_name` for loaded `params` and checks the params fit it.

    `num_classes` comes from the checkpoint's head and, for a ViT, `representation_size` from
    its `pre_logits` (released ImageNet-21k files have one, fine-tuned ones do not) and
    `distilled` from its `dist_token`, and for a Swin the window from its tables, unless given
    in `overrides`. The resolution is the
    checkpoint's (`infer_image_size`; Swin and BEiT: `RELATIVE_FAMILIES`) unless `image_size`
    is given, in which case the position table (Swin, BEiT: the relative position tables) is
    resampled to the new grid as fine-tuning does. Anything
    else that differs from the model fails with one error listing every missing, extra and
    mis-shaped parameter.

    `checkpoint_grid_shape=(rows, cols)` is the patch grid the checkpoint was trained at; it is
    needed only when its position table is not a square grid (on the command line of
    `vit_jax.predict` / `vit_jax.attention`: `--overrides='{"checkpoint_grid_shape": [2, 3]}'`).
    An MLP head (`head_hidden`) is read from the params; `num_features` is the width of the
    per-image features a regression head also reads (its `task.json` says).
    """
    params = dict(params)
    refuse_pretraining_tree(params)
    kwargs: dict[str, Any] = {}
    if "num_classes" not in overrides:  # num_classes=0: a features model for a headless tree
        kwargs["num_classes"] = head_size(params)
    head_hidden = params.get("head_hidden")
    if isinstance(head_hidden, Mapping) and "kernel" in head_hidden:  # an MLP head
        kwargs["head_hidden_size"] = int(np.shape(head_hidden["kernel"])[-1])
    if models.model_class(model_name) is models_vit.VisionTransformer:
        pre_logits = params.get("pre_logits")
        if isinstance(pre_logits, Mapping) and "kernel" in pre_logits:
            kwargs["representation_size"] = int(np.shape(pre_logits["kernel"])[-1])
        else:
            kwargs["representation_size"] = None
        kwargs["distilled"] = "dist_token" in params  # DeiT's distillation token and head
    if models.model_class(model_name) is models.SwinTransformer:
        kwargs["window_size"] = models_swin.checkpoint_window(params)  # a fine-tuned one's 12
    kwargs.update(overrides)
    model = models.get_model(model_name, **kwargs)
    classifier = getattr(model, "classifier", "gap")
    if classifier not in model_heads.POOLED_CLASSIFIERS:
        raise ValueError(
            f"Model {model_name!r} has classifier={classifier!r}, which gives one prediction per "
            f"token; prediction needs one of {', '.join(model_heads.POOLED_CLASSIFIERS)}."
        )
    is_vit = isinstance(model, models_vit.VisionTransformer)
    relative = isinstance(model, models.SwinTransformer | models.Beit)
    old_grid = None  # a Mixer at a given image_size needs none: its shapes must match as they are
    if relative and image_size is None:
        image_size = RELATIVE_FAMILIES[type(model)](params, model)
    if (is_vit or image_size is None) and not relative:
        old_grid = checkpoint_grid(
            params, model, checkpoint_grid_shape, image_size_given=image_size is not None
        )
    if image_size is None:
        size = infer_image_size(params, model, grid_shape=old_grid)
    else:
        size = int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {size}.")
    features = {}
    if num_features:
        features["features"] = jax.ShapeDtypeStruct((1, num_features), jnp.float32)
    shapes = jax.eval_shape(
        lambda x, kw: model.init(jax.random.PRNGKey(0), x, train=False, **kw),
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        features,
    )["params"]
    if checkpoint.is_scanned(shapes):
        shapes = checkpoint.unscan_params(shapes)
    if is_vit:
        (patch_h, patch_w), stride = patch_and_stride(model)
        new_grid = (size // (patch_h * stride), size // (patch_w * stride))
        if new_grid != old_grid:
            params = resample_position_table(params, shapes, old_grid, new_grid)
    if relative:  # relative position tables for the window / grid at this size
        params, _ = relative_positions.resize_relative_tables(params, shapes)
    try:
        params = checkpoint.inspect_params(params=params, expected=shapes)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(
            f"The checkpoint does not fit model {model_name!r} at {size} px (is the model name "
            f"right? a non-zoo architecture needs its overrides). {e}"
        ) from None
    if getattr(model, "scan", False):
        params = checkpoint.scan_params(params)
    return model, params, size
