"""The ViT's options: their valid values, their defaults and the checks the model and the
training config share (so a bad value fails before any work, with the same message).

`vit_jax.models_vit` re-exports every name here; the model itself lives there.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import model_heads, models_resnet, stochastic_depth

CLASSIFIERS = ("token", "gap", "unpooled", "token_unpooled")
# The MLP blocks' GELU: 'gelu_tanh' is the original's (tanh approximation); 'gelu' is the exact
# erf form of PyTorch's nn.GELU, which weights trained in PyTorch (DeiT and others) expect.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
}
# What the weights expect of the pixels. Every pipeline gives the model x/127.5 − 1, the
# original's ('inception': mean = std = 0.5 per channel); weights trained in PyTorch on ImageNet
# mean/std inputs (DeiT, MAE; timm's `pretrained_cfg`) need 'imagenet', which the model applies
# to its input itself, so training, evaluation, predict and attention maps all feed it right.
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# 'flax' is the original's attention (flax.linen.dot_product_attention); the others call
# jax.nn.dot_product_attention with implementation None ('auto'), 'xla' or 'cudnn'.
ATTENTION_IMPLS = ("flax", "auto", "xla", "cudnn")
# Rematerialisation policies that need no arguments, by their jax.checkpoint_policies name.
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)
LAYERNORM_EPSILON = 1e-6
# What a `transformer` config without these keys gets: the original Encoder's defaults. One
# place, read by the model and by the training config's checks (`transformer_option`).
TRANSFORMER_DEFAULTS = {"dropout_rate": 0.1, "attention_dropout_rate": 0.1}


def transformer_option(transformer: Any, key: str) -> Any:
    """`transformer[key]`, or its default from TRANSFORMER_DEFAULTS when the config lacks it."""
    return _field(transformer, key, TRANSFORMER_DEFAULTS.get(key))


def _field(config: Any, key: str, default: Any = None) -> Any:
    """Reads `key` from a ConfigDict, a Mapping or an object with attributes."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _validate_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"Unknown {name}={value!r}; valid values: {valid}.")


def validate_options(
    *,
    classifier: str,
    attention_impl: str = "flax",
    remat_policy: str | None = None,
    batch_chunks: int = 1,
    matmul_dtype: Any = None,
    drop_path_rate: float = 0.0,
    activation: str = "gelu_tanh",
    distilled: bool = False,
    input_norm: str = "inception",
) -> None:
    """Raises ValueError listing the valid values when an option is unknown or out of range."""
    stochastic_depth.check_drop_path_rate(drop_path_rate)
    _validate_choice("classifier", classifier, CLASSIFIERS)
    _validate_choice("activation", activation, tuple(ACTIVATIONS))
    _validate_choice("input_norm", input_norm, tuple(INPUT_NORMS))
    model_heads.check_distilled(distilled, classifier)
    if matmul_dtype is not None and _float_dtype(matmul_dtype) is None:
        raise ValueError(
            f"matmul_dtype must be None or a floating dtype such as jnp.bfloat16, got "
            f"{matmul_dtype!r}."
        )
    _validate_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
    if remat_policy is not None:
        _validate_choice("remat_policy", remat_policy, REMAT_POLICIES)
    if isinstance(batch_chunks, bool) or not isinstance(batch_chunks, int) or batch_chunks < 1:
        raise ValueError(f"batch_chunks must be an integer >= 1, got {batch_chunks!r}.")


def normalize_input(images: jax.Array, input_norm: str) -> jax.Array:
    """Pipeline images in [-1, 1] (x/127.5 − 1) → the normalisation `input_norm` names."""
    if input_norm == "inception":
        return images  # already (x/255 − 0.5) / 0.5
    mean, std = (jnp.asarray(v, jnp.float32) for v in INPUT_NORMS[input_norm])
    return ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std


def _float_dtype(value: Any) -> jnp.dtype | None:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        return None
    return dtype if jnp.issubdtype(dtype, jnp.floating) else None


def stem_stride(resnet: Any | None) -> int:
    """Downsampling of the hybrid ResNet stem before the patch embedding (1 without one)."""
    if resnet is None:
        return 1
    return models_resnet.stem_stride(len(tuple(_field(resnet, "num_layers"))))


def check_num_classes(num_classes: Any) -> None:
    """ValueError unless `num_classes` is None, 0 (no head) or a positive integer."""
    valid = num_classes is None or (
        isinstance(num_classes, numbers.Integral)
        and not isinstance(num_classes, bool)
        and num_classes >= 0
    )
    if not valid:
        raise ValueError(
            f"num_classes must be a positive integer (the head's size), or 0 / None for a model "
            f"without a head that returns features; got {num_classes!r}."
        )


def check_image_size(
    image_hw: tuple[int, int],
    patch_size: tuple[int, int],
    stride: int = 1,
    model_name: str | None = None,
) -> None:
    """Raises a clear ValueError unless the image tiles exactly into patches."""
    total = (stride * patch_size[0], stride * patch_size[1])
    if image_hw[0] % total[0] or image_hw[1] % total[1]:
        what = f"model {model_name!r}" if model_name else "this model"
        stem = f" (patch {tuple(patch_size)} after a stem of stride {stride})" if stride > 1 else ""
        nearest = tuple(max(1, round(s / t)) * t for s, t in zip(image_hw, total, strict=True))
        raise ValueError(
            f"Image size {tuple(image_hw)} is not divisible by the patch size {total} of "
            f"{what}{stem}. Use a multiple of {total}, e.g. {nearest}."
        )
