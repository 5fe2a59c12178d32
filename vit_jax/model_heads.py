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

The distillation token (DeiT; `VisionTransformer(distilled=True)`, class token only): a learned
`dist_token` of shape (1, 1, D), zero-initialised like the class token, is inserted right after
the class token, so the position table has two special rows before the patch grid. Both tokens'
encoder outputs go through `pre_logits` (one shared layer; its intermediate then holds both,
[batch, 2, D]) and then through their own head: `head` for the class token, `head_dist` (the
same init, and its own `head_dist_hidden` with `head_hidden_size`) for the distillation token.
Contract: with `train=True` the model returns the pair (class-token logits, distillation-token
logits), which a distillation loss trains against the labels and the teacher; with
`train=False` it returns their mean (how DeiT is evaluated), one [batch, classes] array as for
any other model. Without a head (num_classes 0 / None) both modes return the mean of the two
pooled tokens.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLED_CLASSIFIERS = ("token", "gap")


def check_distilled(distilled: Any, classifier: str) -> None:
    """ValueError unless `distilled` is a bool, and True only with classifier='token'."""
    if not isinstance(distilled, bool):
        raise ValueError(f"distilled must be True or False, got {distilled!r}.")
    if distilled and classifier != "token":
        raise ValueError(
            f"distilled=True needs classifier='token' (the distillation token is pooled like "
            f"the class token, with its own head), got classifier={classifier!r}."
        )


def insert_dist_token(module: nn.Module, x: jax.Array) -> jax.Array:
    """[cls, patches...] → [cls, dist_token, patches...]; `dist_token` is `module`'s param.

    Call it from the model's compact method, so the parameter sits at the model's top level.
    """
    token = module.param("dist_token", nn.initializers.zeros, (1, 1, x.shape[-1]))
    token = jnp.tile(token.astype(x.dtype), (x.shape[0], 1, 1))
    return jnp.concatenate([x[:, :1], token, x[:, 1:]], axis=1)


def distilled_heads(
    head_fn: Callable[..., jax.Array],
    x: jax.Array,
    features: jax.Array | None,
    *,
    train: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The two heads on `x`, [batch, 2, D] (class, distillation token): see the module doc.

    `head_fn` is `head` with the model's head options bound; it is called once per token,
    as `head` and as `head_dist`. Outputs are float32.
    """
    cls_out = head_fn(x[:, 0], features, name="head").astype(jnp.float32)
    dist_out = head_fn(x[:, 1], features, name="head_dist").astype(jnp.float32)
    if train and head_fn.keywords.get("num_classes"):
        return cls_out, dist_out
    return (cls_out + dist_out) / 2


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
    name: str = "head",
) -> jax.Array:
    """[features ⊕ x] → (head_hidden → GELU) → head, inside the calling module's scope.

    Call it from a compact method: its Dense layers become the caller's `head_hidden` and
    `head` (`{name}_hidden` and `{name}` for another `name`, e.g. the distilled `head_dist`).
    Without `num_classes` (0 or None) there is no head and so no hidden layer either: the model
    returns the (concatenated) features. `head_hidden` uses Dense's defaults (lecun
    normal kernel, zero bias), so it starts with unit-scale activations; `head` keeps the
    original's zero kernel, so every model starts predicting `bias_init`.
    """
    if features is not None:
        x = jnp.concatenate([x, jnp.asarray(features).astype(x.dtype)], axis=-1)
    if not num_classes:
        return x
    if hidden_size:
        x = nn.Dense(features=hidden_size, dtype=dtype, name=f"{name}_hidden")(x)
        x = nn.gelu(x, approximate=False)
    return nn.Dense(
        features=num_classes,
        dtype=dtype,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(bias_init),
        name=name,
    )(x)
