"""MLP-Mixer (Flax linen), parameter-compatible with the released Mixer checkpoints."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import model_heads
from vit_jax.models_vit import IdentityLayer, _field, check_image_size, check_num_classes


class MlpBlock(nn.Module):
    """Dense → GELU (tanh approximation) → Dense back to the input width."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
        y = nn.gelu(y, approximate=True)
        return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
    """x + token_mixing(LN(x)ᵀ)ᵀ, then x + channel_mixing(LN(x))."""

    tokens_mlp_dim: int
    channels_mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, dtype=self.dtype, name="token_mixing")(y)
        x = x + jnp.swapaxes(y, 1, 2)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        return x + MlpBlock(self.channels_mlp_dim, dtype=self.dtype, name="channel_mixing")(y)


class MlpMixer(nn.Module):
    """MLP-Mixer with the original's constructor; `train` is accepted for a uniform call.

    `head_hidden_size` and the `features` argument are the ViT's (`vit_jax.model_heads`): a
    hidden layer before the head, and [batch, F] extra inputs concatenated to the pooled
    features. Both are off by default, which leaves the released parameter tree.
    """

    patches: Any
    num_classes: int | None
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    model_name: str | None = None
    dtype: Any = jnp.float32
    head_hidden_size: int | None = None

    @nn.compact
    def __call__(
        self, inputs: jax.Array, *, train: bool, features: jax.Array | None = None
    ) -> jax.Array:
        del train  # Mixer has no dropout.
        patch_size = tuple(_field(self.patches, "size"))
        check_num_classes(self.num_classes)
        model_heads.check_head_hidden_size(self.head_hidden_size)
        model_heads.check_features(features, inputs.shape)
        check_image_size(inputs.shape[1:3], patch_size, 1, self.model_name)
        x = nn.Conv(self.hidden_dim, patch_size, strides=patch_size, dtype=self.dtype, name="stem")(
            inputs.astype(self.dtype)
        )
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        for _ in range(self.num_blocks):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, dtype=self.dtype)(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="pre_head_layer_norm")(x)
        x = jnp.mean(x, axis=1)
        x = IdentityLayer(name="pre_logits")(x)  # no params; names the features like the ViT
        x = model_heads.head(
            x,
            features,
            num_classes=self.num_classes,
            hidden_size=self.head_hidden_size,
            dtype=self.dtype,
        )
        return x.astype(jnp.float32)
