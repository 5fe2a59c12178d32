"""The classification head shared by the ViT and the Mixer, and its two recipe options.

`head_hidden_size` puts a hidden layer in front of the head: Dense(head_hidden_size) named
`head_hidden`, exact (erf) GELU, then the usual zero-initialised `head`. That is the regression
recipe's "Linear(D, 128) → GELU → Linear(128, 1)", whose GELU is PyTorch's default `nn.GELU`,
the erf form (the encoder's MLPs keep the original's tanh approximation).

`features` are extra per-example inputs ([batch, F], e.g. Kaggle Pawpularity's metadata
columns) concatenated to the pooled image features (the output of `pre_logits`) before the
head, so the head sees both. The `pre_logits` intermediate stays the image features alone.

With both off (the defaults) the head is the original single Dense `head` and the parameter
tree is the released files'. The head's parameters sit at the top level of the model (`head`,
`head_hidden`), because the head is built inline by `head` below, not as a sub-module.
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLED_CLASSIFIERS = ("token", "gap")


def check_head_hidden_size(value: Any) -> None:
    """ValueError unless `value` is None, 0 (no hidden layer) or a positive integer."""
    valid = value is None or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
    )
    if not valid:
        raise ValueError(
            f"head_hidden_size must be a positive integer (the width of the hidden layer "
            f"before the head, e.g. 128), or 0 / None for the single Dense head; got {value!r}."
        )


def check_features(
    features: jax.Array | None, images_shape: tuple[int, ...], classifier: str = "gap"
) -> None:
    """ValueError unless `features` is None or [batch, F] with the images' batch size.

    Checked before the forward pass, so a batch whose metadata came from another batch fails
    at once. Only pooled outputs (one vector per image) can take features.
    """
    if features is None:
        return
    shape = tuple(getattr(features, "shape", ()))
    if len(shape) != 2:
        raise ValueError(
            f"features must have shape [batch, F] (one row of extra inputs per image), got "
            f"shape {shape}."
        )
    if shape[0] != images_shape[0]:
        raise ValueError(
            f"features has shape {shape} but the images have shape {tuple(images_shape)}: "
            f"their batch sizes ({shape[0]} and {images_shape[0]}) must match, one row of "
            "features per image."
        )
    if classifier not in POOLED_CLASSIFIERS:
        raise ValueError(
            f"features= needs one pooled vector per image, but classifier={classifier!r} "
            f"returns one per token; use one of {', '.join(map(repr, POOLED_CLASSIFIERS))}."
        )


def head(
    x: jax.Array,
    features: jax.Array | None = None,
    *,
    num_classes: int | None,
    hidden_size: int | None = None,
    bias_init: float = 0.0,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """[features ⊕ x] → (head_hidden → GELU) → head, inside the calling module's scope.

    Call it from a compact method: its Dense layers become the caller's `head_hidden` and
    `head`. Without `num_classes` (0 or None) there is no head and so no hidden layer either:
    the model returns the (concatenated) features. `head_hidden` uses Dense's defaults (lecun
    normal kernel, zero bias), so it starts with unit-scale activations; `head` keeps the
    original's zero kernel, so every model starts predicting `bias_init`.
    """
    if features is not None:
        x = jnp.concatenate([x, jnp.asarray(features).astype(x.dtype)], axis=-1)
    if not num_classes:
        return x
    if hidden_size:
        x = nn.Dense(features=hidden_size, dtype=dtype, name="head_hidden")(x)
        x = nn.gelu(x, approximate=False)
    return nn.Dense(
        features=num_classes,
        dtype=dtype,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(bias_init),
        name="head",
    )(x)
