"""Learning-rate schedules and optimizers (optax) for pretraining and fine-tuning.

This module owns the schedule formula and the optimizer choice; the training loop reads the
config and calls these with plain arguments. The schedule is a function of the optimizer's
update count (0 for the first update), so the lr the loop logs for a step is the lr optax
applies at that step, and the first update already has a non-zero lr.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DECAY_TYPES = ("cosine", "linear")
OPTIMIZERS = ("sgd", "adam", "adamw")

Schedule = Callable[[jax.Array | int], jax.Array]


def learning_rate_schedule(
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    decay_type: str = "cosine",
    linear_end: float = 0.0,
) -> Schedule:
    """Linear warmup to `base_lr`, then cosine or linear decay to `linear_end` at `total_steps`.

    With t = count + 1 the 1-based update number:
      warmup factor  min(1, t / warmup_steps)          (1 when warmup_steps == 0)
      progress       clip((t - warmup_steps) / (total_steps - warmup_steps), 0, 1)
      cosine         linear_end + (base_lr - linear_end) · ½(1 + cos(π · progress))
      linear         linear_end + (base_lr - linear_end) · (1 - progress)
    The first update uses base_lr / warmup_steps (not 0) and the last one `linear_end`.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"Unknown decay_type={decay_type!r}; valid values: {DECAY_TYPES}.")
    for key, value in (("base_lr", base_lr), ("linear_end", linear_end)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be ≥ 0 and finite (a learning rate), got {value}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be ≥ 0, got {warmup_steps}.")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must be larger than warmup_steps ({warmup_steps}); "
            "lower warmup_steps or raise total_steps."
        )

    def schedule(count):
        t = jnp.asarray(count, jnp.float32) + 1.0
        progress = jnp.clip((t - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        if decay_type == "cosine":
            shape = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            shape = 1.0 - progress
        lr = linear_end + (base_lr - linear_end) * shape
        if warmup_steps:
            lr = lr * jnp.minimum(1.0, t / warmup_steps)
        return lr.astype(jnp.float32)

    return schedule


def kernel_mask(params: Any) -> Any:
    """True for weight matrices and convolution kernels (params named `kernel`), else False.

    Weight decay applies to these only: never to biases, LayerNorm/GroupNorm scales, the class
    token or the position table.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def layer_ids(params: Any, num_layers: int) -> Any:
    """Each ViT or BEiT parameter's depth for layer-wise lr decay (BEiT's and MAE's numbering).

    0 for what comes before the blocks (a hybrid's ResNet stem, patch embedding, class and
    distillation tokens, the position table), i + 1 for block i (`encoderblock_{i}`, BEiT's
    `blocks_{i}`), num_layers + 1 for everything
    after (the final norm, `pre_logits`, the heads). A scanned encoder's stacked
    `encoderblock` gets the vector 1 … num_layers along its leading (layer) axis; a
    pretraining tree's ViT under `encoder` is numbered as the ViT itself.
    """

    def layer_id(path, leaf):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] == "encoder" and len(keys) > 1:  # a pretraining tree: the ViT under it
            keys = keys[1:]
        before_blocks = (
            "embedding", "cls", "dist_token", "conv_root", "gn_root", "patch_embed", "cls_token"
        )  # fmt: skip
        if keys[0] in before_blocks or re.fullmatch(r"block\d+", str(keys[0])):  # the hybrid stem
            return 0
        if "posembed_input" in keys:
            return 0
        for key in keys:
            if key == "encoderblock":  # scanned: leading axis = layer
                ids = np.arange(1, num_layers + 1)
                return ids.reshape((num_layers,) + (1,) * (np.ndim(leaf) - 1))
            if isinstance(key, str) and key.startswith(("encoderblock_", "blocks_")):
                return int(key.rsplit("_", 1)[1]) + 1
        return num_layers + 1

    return jax.tree_util.tree_map_with_path(layer_id, params)


def scale_by_layer_decay(decay: float, num_layers: int) -> optax.GradientTransformation:
    """Multiplies each update by decay^(num_layers + 1 − its layer id): the blocks near the
    input learn slower (MAE fine-tunes ViT-B with 0.65). Applied after the optimizer, it scales
    the whole update, weight decay included, as a per-layer learning rate does."""

    def update(updates, state, params=None):
        del params
        ids = layer_ids(updates, num_layers)
        scaled = jax.tree.map(
            lambda u, i: u * jnp.asarray(decay ** (num_layers + 1 - i), u.dtype), updates, ids
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    name: str,
    schedule: Schedule,
    *,
    grad_clip_norm: float | None = 1.0,
    momentum: float = 0.9,
    accumulator_dtype: Any = None,
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 0.0,
    layer_decay: float = 1.0,
    num_layers: int = 0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then SGD with momentum, Adam, or AdamW with kernel-only weight decay.

    `accumulator_dtype` sets the dtype of SGD's momentum buffer and Adam's first moment (e.g.
    jnp.bfloat16 to save memory). AdamW's decay is decoupled from the gradient and scaled by the
    scheduled lr (optax.adamw).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid values: {OPTIMIZERS}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}.")
    if name == "sgd":
        if weight_decay:
            raise ValueError("optimizer 'sgd' takes no weight_decay; use 'adamw' or set it to 0.")
        core = optax.sgd(schedule, momentum=momentum or None, accumulator_dtype=accumulator_dtype)
    elif name == "adam":
        if weight_decay:
            raise ValueError("optimizer 'adam' takes no weight_decay; use 'adamw' for decay.")
        core = optax.adam(schedule, b1=b1, b2=b2, mu_dtype=accumulator_dtype)
    else:
        core = optax.adamw(
            schedule,
            b1=b1,
            b2=b2,
            mu_dtype=accumulator_dtype,
            weight_decay=weight_decay,
            mask=kernel_mask,
        )
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = off), got {layer_decay}.")
    if layer_decay != 1.0:
        if num_layers < 1:
            raise ValueError("layer_decay applies to ViT encoders (it needs their depth).")
        core = optax.chain(core, scale_by_layer_decay(layer_decay, num_layers))
    if grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), core)
    return core
