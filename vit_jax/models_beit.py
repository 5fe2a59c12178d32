"""The BEiT backbone (Bao et al. 2021) in Flax linen, numerically timm's `beit_*` models.

A ViT variant: 16×16 patches (Conv) and a class token, no absolute position table; every block
has its own learned relative position bias over the whole patch grid ((2M−1)² offset rows plus
3 for the class token, `relative_positions`), LayerScale (`gamma_1`, `gamma_2`, started at
`layer_scale_init`), and a fused `qkv` projection without bias plus separate `q_bias` and
`v_bias` (keys have none: a key bias adds a constant per query, which softmax ignores).
Pre-LN blocks with exact GELU and LayerNorm ε 1e-6; the head averages the patch tokens (class
token left out), applies `fc_norm` and then `head`. Stochastic depth is linear over the blocks.

The parameter tree follows timm's names (`cls_token`, `patch_embed/proj`, `blocks_{i}/{norm1,
attn/{qkv, q_bias, v_bias, relative_position_bias_table, proj}, gamma_1, norm2, mlp/{fc1,
fc2}, gamma_2}`, `fc_norm`, `head`), so a timm state dict converts by renaming and
transposing (`vit_jax.timm_weights`). BEiT's weights expect pixels normalised with mean = std =
0.5, which is the pipelines' [-1, 1] as it is (`input_norm='inception'`).

BEiT's masked-image-modelling pretraining needs a pretrained discrete tokenizer (DALL-E's
dVAE) and is not here: this module is the backbone, for fine-tuning released weights.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import model_heads, relative_positions, stochastic_depth
from vit_jax.vit_options import check_image_size, normalize_input

LAYERNORM_EPSILON = 1e-6


class Attention(nn.Module):
    """Self-attention over the class token and the patch grid, with the relative bias."""

    num_heads: int
    grid: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = nn.Dense(3 * dim, use_bias=False, dtype=self.dtype, name="qkv")(x)
        q_bias = self.param("q_bias", nn.initializers.zeros, (dim,))
        v_bias = self.param("v_bias", nn.initializers.zeros, (dim,))
        bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        qkv = (qkv + bias).reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [B, heads, N, hd]
        rows, cols = self.grid
        table = self.param(
            relative_positions.TABLE,
            nn.initializers.zeros,
            ((2 * rows - 1) * (2 * cols - 1) + relative_positions.CLASS_TOKEN_ROWS, self.num_heads),
        )
        index = relative_positions.relative_position_index(rows, cols, class_token=True)
        relative = table[index.reshape(-1)].reshape(tokens, tokens, self.num_heads)
        logits = (q * head_dim**-0.5) @ k.swapaxes(-1, -2)
        logits = logits.astype(jnp.float32) + relative.transpose(2, 0, 1)[None]
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out)


class BeitBlock(nn.Module):
    """x + γ₁·Attention(LN(x)); x + γ₂·MLP(LN(x)) (ratio mlp_dim / D, exact GELU)."""

    num_heads: int
    mlp_dim: int
    grid: tuple[int, int]
    layer_scale_init: float | None
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dim = x.shape[-1]
        drops = train and self.drop_path_rate > 0
        keys = jax.random.split(self.make_rng("dropout")) if drops else (None, None)
        y = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, self.grid, self.dtype, name="attn")(y)
        y = self._scale(y, "gamma_1", dim)
        if drops:
            y, _ = stochastic_depth.drop_path(y, self.drop_path_rate, keys[0])
        x = x + y
        y = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm2")(x)
        y = _Mlp(self.mlp_dim, self.dtype, name="mlp")(y)
        y = self._scale(y, "gamma_2", dim)
        if drops:
            y, _ = stochastic_depth.drop_path(y, self.drop_path_rate, keys[1])
        return x + y

    def _scale(self, y: jax.Array, name: str, dim: int) -> jax.Array:
        if self.layer_scale_init is None:  # BEiT without LayerScale: no gamma params
            return y
        gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (dim,))
        return y * gamma.astype(y.dtype)


class _Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class Beit(nn.Module):
    """BEiT; `num_classes` 0 / None returns the pooled, `fc_norm`-ed features."""

    num_classes: int | None
    patches: Any = None  # {'size': (16, 16)}, as a ViT's
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_scale_init: float | None = 0.1
    drop_path_rate: float = 0.0
    input_norm: str = "inception"
    head_hidden_size: int | None = None
    head_bias_init: float = 0.0
    model_name: str | None = None
    dtype: Any = jnp.float32

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.patches["size"] if self.patches is not None else (16, 16)
        return tuple(int(d) for d in size)

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, features: jax.Array | None = None
    ) -> jax.Array:
        check_image_size(images.shape[1:3], self.patch_size, 1, self.model_name)
        model_heads.check_head_hidden_size(self.head_hidden_size)
        model_heads.check_features(features, images.shape)
        x = normalize_input(images, self.input_norm).astype(self.dtype)
        x = _PatchEmbed(self.hidden_size, self.patch_size, self.dtype, name="patch_embed")(x)
        n, rows, cols, dim = x.shape
        x = x.reshape(n, rows * cols, dim)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, dim))
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
        rates = stochastic_depth.drop_path_rates(self.drop_path_rate, self.num_layers)
        for i in range(self.num_layers):
            x = BeitBlock(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                grid=(rows, cols),
                layer_scale_init=self.layer_scale_init,
                drop_path_rate=float(rates[i]),
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, train=train)
        x = jnp.mean(x[:, 1:], axis=1)
        x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="fc_norm")(x)
        x = model_heads.head(
            x,
            features,
            num_classes=self.num_classes,
            hidden_size=self.head_hidden_size,
            bias_init=self.head_bias_init,
            dtype=self.dtype,
        )
        return x.astype(jnp.float32)


class _PatchEmbed(nn.Module):
    dim: int
    patch: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(self.dim, self.patch, strides=self.patch, padding="VALID", dtype=self.dtype,
                       name="proj")  # fmt: skip
        return conv(x)


def checkpoint_image_size(params: dict[str, Any], model: Beit) -> int:
    """The image size a BEiT checkpoint was trained at: its tables' grid × the patch size."""
    rows = np.shape(params["blocks_0"]["attn"][relative_positions.TABLE])[0]
    side = math.isqrt(rows - relative_positions.CLASS_TOKEN_ROWS)
    return (side + 1) // 2 * model.patch_size[0]
