"""The Swin Transformer (Liu et al. 2021) in Flax linen, numerically timm's `swin_*` models.

4×4 patches (Conv) + LayerNorm; stages of blocks with window attention, every second block's
windows cyclically shifted by ⌊M/2⌋ with the attention masked between regions that were not
adjacent (`shift_mask`); a learned relative position bias per block ((2M−1)² × heads entries,
indexed by `relative_position_index`); patch merging (2×2 concat → LayerNorm → Linear 4C → 2C,
no bias) at the start of stages 2–4; final LayerNorm, global average pooling, head. Exact GELU,
LayerNorm ε 1e-5, optional stochastic depth (linear over all blocks, per sample).

A stage whose resolution is not above the window size attends over the whole stage in one
window without shift, as timm does (Swin-T's last stage at 224 px: 7 × 7 tokens, window 7).
Image sizes whose stages the windows cannot tile are refused (`check_image_size`).

The parameter tree follows timm's names (`patch_embed/{proj,norm}`,
`layers_{i}_downsample/{norm,reduction}`, `layers_{i}_blocks_{j}/{norm1, attn/{qkv, proj,
relative_position_bias_table}, norm2, mlp/{fc1,fc2}}`, `norm`, `head`), so a timm state dict
converts by renaming and transposing (`timm_path`, `vit_jax.timm_weights`). Weights trained in
PyTorch expect ImageNet mean/std pixels: `input_norm='imagenet'` (the default here) maps the
pipelines' [-1, 1].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import model_heads, relative_positions, stochastic_depth
from vit_jax.vit_options import normalize_input

LAYERNORM_EPSILON = 1e-5
MASK_VALUE = -100.0  # added to the attention logits between regions that were not adjacent
# Zoo: (embed_dim, depths, heads, window, image size) of timm's swin_*_patch4_window*.
SWIN_CONFIGS: dict[str, dict[str, Any]] = {
    "Swin-T_4_w7": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "Swin-S_4_w7": dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7
    ),
    "Swin-B_4_w7": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7
    ),
    "Swin-B_4_w12": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
    ),
    "Swin-L_4_w7": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7
    ),
    "Swin-L_4_w12": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12
    ),
}
TIMM_NAMES = {  # the timm model each zoo entry's counts and weights are timm's of
    "Swin-T_4_w7": "swin_tiny_patch4_window7_224",
    "Swin-S_4_w7": "swin_small_patch4_window7_224",
    "Swin-B_4_w7": "swin_base_patch4_window7_224",
    "Swin-B_4_w12": "swin_base_patch4_window12_384",
    "Swin-L_4_w7": "swin_large_patch4_window7_224",
    "Swin-L_4_w12": "swin_large_patch4_window12_384",
}


# ----------------------------------------------------------------------------------------------
# Windows, masks, relative positions (pure NumPy / jnp, tested by hand).


def relative_position_index(window: int) -> np.ndarray:
    """[M², M²] index into the (2M−1)² bias table: (Δrow + M−1)·(2M−1) + (Δcol + M−1)."""
    return relative_positions.relative_position_index(window, window)


def stage_window(resolution: int, window: int, shift: int) -> tuple[int, int]:
    """(window, shift) a stage of `resolution` tokens per side uses: the whole stage, unshifted,
    when it is not larger than the window."""
    return (resolution, 0) if resolution <= window else (window, shift)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """[B, H, W, C] → [B·windows, M², C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """The inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """[windows, M², M²]: 0 between tokens of the same region of the shifted map, MASK_VALUE
    between tokens the cyclic shift brought together from regions that were not adjacent."""
    regions = np.zeros((resolution, resolution), np.float32)
    bands = (
        (0, resolution - window),
        (resolution - window, resolution - shift),
        (resolution - shift, resolution),
    )
    label = 0
    for r0, r1 in bands:
        for c0, c1 in bands:
            regions[r0:r1, c0:c1] = label
            label += 1
    n = resolution // window  # the windows of the region map, as window_partition orders them
    ids = regions.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, -1)
    return np.where(ids[:, None, :] != ids[:, :, None], MASK_VALUE, 0.0).astype(np.float32)


def check_image_size(image_size: int, depths: tuple[int, ...], window: int, patch: int = 4) -> None:
    """ValueError unless every stage's resolution is a multiple of the window or fits in one."""
    grid = image_size // patch
    resolutions = [grid // 2**i for i in range(len(depths))]
    ok = image_size % (patch * 2 ** (len(depths) - 1)) == 0 and all(
        r <= window or r % window == 0 for r in resolutions
    )
    if not ok:
        unit = patch * window * 2 ** (len(depths) - 1)
        raise ValueError(
            f"Image size {image_size} does not tile into Swin windows of {window} at every stage "
            f"(stage resolutions {resolutions}); use a multiple of {unit}, e.g. {unit} or "
            f"{2 * unit} (window {window}), or change window_size."
        )


# ----------------------------------------------------------------------------------------------
# Modules.


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with the learned relative position bias."""

    num_heads: int
    window: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        batch_windows, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch_windows, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each [B·nW, heads, N, hd]
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(0.02),
            ((2 * self.window - 1) ** 2, self.num_heads),
        )
        index = relative_position_index(self.window).reshape(-1)
        bias = table[index].reshape(tokens, tokens, self.num_heads).transpose(2, 0, 1)
        logits = (q * head_dim**-0.5) @ k.swapaxes(-1, -2) + bias[None].astype(q.dtype)
        if mask is not None:
            windows = mask.shape[0]
            logits = logits.reshape(-1, windows, self.num_heads, tokens, tokens)
            logits = (logits + jnp.asarray(mask)[None, :, None]).reshape(
                -1, self.num_heads, tokens, tokens
            )
        out = jax.nn.softmax(logits, axis=-1) @ v
        out = out.transpose(0, 2, 1, 3).reshape(batch_windows, tokens, dim)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out)


class SwinBlock(nn.Module):
    """LN → (shifted-)window attention → residual; LN → MLP (ratio 4, exact GELU) → residual."""

    num_heads: int
    window: int
    shift: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        _, h, w, c = x.shape
        window, shift = stage_window(h, self.window, self.shift)
        y = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm1")(x)
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        mask = shift_mask(h, window, shift) if shift else None
        attention = WindowAttention(self.num_heads, window, self.dtype, name="attn")
        y = window_reverse(attention(window_partition(y, window), mask), window, h, w)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        drops = train and self.drop_path_rate > 0
        keys = jax.random.split(self.make_rng("dropout")) if drops else (None, None)
        if drops:
            y, _ = stochastic_depth.drop_path(y, self.drop_path_rate, keys[0])
        x = x + y
        y = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm2")(x)
        hidden = int(c * self.mlp_ratio)
        y = _Mlp(hidden, self.dtype, name="mlp")(y)
        if drops:
            y, _ = stochastic_depth.drop_path(y, self.drop_path_rate, keys[1])
        return x + y


class _Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class PatchMerging(nn.Module):
    """2×2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)) → LayerNorm → Linear 2C."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
        x = x.reshape(b, h // 2, w // 2, 4 * c)
        x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, name="reduction")(x)


class SwinTransformer(nn.Module):
    """Swin Transformer; `num_classes` 0 / None returns the pooled features."""

    num_classes: int | None
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    input_norm: str = "imagenet"
    head_hidden_size: int | None = None
    head_bias_init: float = 0.0
    model_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, features: jax.Array | None = None
    ) -> jax.Array:
        check_image_size(images.shape[1], tuple(self.depths), self.window_size, self.patch_size)
        model_heads.check_head_hidden_size(self.head_hidden_size)
        model_heads.check_features(features, images.shape)
        x = normalize_input(images, self.input_norm).astype(self.dtype)
        embed = _PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name="patch_embed")
        x = embed(x)
        rates = stochastic_depth.drop_path_rates(self.drop_path_rate, sum(self.depths))
        block = 0
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
            stage = f"layers_{i}"
            if i > 0:
                x = PatchMerging(self.dtype, name=f"{stage}_downsample")(x)
            for j in range(depth):
                x = SwinBlock(
                    num_heads=heads,
                    window=self.window_size,
                    shift=0 if j % 2 == 0 else self.window_size // 2,
                    mlp_ratio=self.mlp_ratio,
                    drop_path_rate=float(rates[block]),
                    dtype=self.dtype,
                    name=f"{stage}_blocks_{j}",
                )(x, train=train)
                block += 1
        x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm")(x)
        x = jnp.mean(x, axis=(1, 2))
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
    patch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = (self.patch, self.patch)
        x = nn.Conv(self.dim, p, strides=p, padding="VALID", dtype=self.dtype, name="proj")(x)
        return nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm")(x)


def get_swin(name: str, num_classes: int | None = 1000, **overrides: Any) -> SwinTransformer:
    """The zoo Swin `name` (SWIN_CONFIGS) with `overrides`; ValueError listing the names."""
    if name not in SWIN_CONFIGS:
        raise ValueError(f"Unknown Swin model {name!r}; valid: {', '.join(SWIN_CONFIGS)}.")
    return SwinTransformer(
        num_classes=num_classes, model_name=name, **{**SWIN_CONFIGS[name], **overrides}
    )


def timm_path(key: str) -> tuple[str, ...] | None:
    """timm Swin key → our path (`layers.1.blocks.0.attn.qkv.weight` →
    layers_1_blocks_0/attn/qkv/kernel); None for a key with no place in the tree."""
    parts = key.split(".")
    if len(parts) < 2:
        return None
    leaf = {"weight": "kernel", "bias": "bias"}.get(parts[-1], parts[-1])
    if parts[0] == "head" and parts[1] == "fc":
        return ("head", leaf)
    if parts[0] in ("norm", "patch_embed") or "norm" in parts[-2]:
        leaf = "scale" if parts[-1] == "weight" and "norm" in parts[-2] else leaf
    if parts[0] == "norm":
        return ("norm", leaf)
    if parts[0] == "patch_embed":
        return ("patch_embed", parts[1], leaf)
    if parts[0] != "layers":
        return None
    stage = f"layers_{parts[1]}"
    if parts[2] == "downsample":
        return (f"{stage}_downsample", parts[3], leaf)
    if parts[2] == "blocks":
        block = f"{stage}_blocks_{parts[3]}"
        if parts[-1] == "relative_position_bias_table":
            return (block, "attn", "relative_position_bias_table")
        return (block, *parts[4:-1], leaf)
    return None


# ----------------------------------------------------------------------------------------------
# Another window size: the relative position bias tables resampled as BEiT and timm do.


def resample_for(params: dict[str, Any], model: SwinTransformer, image_size: int) -> dict[str, Any]:
    """`params` for `model` at `image_size`: each relative position table whose window differs
    from the one `model` uses there is resized (`relative_positions.resize_bias_table`)."""
    expected = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), train=False
        )
    )["params"]
    return relative_positions.resize_relative_tables(params, expected)[0]


def checkpoint_window(params: dict[str, Any]) -> int:
    """The window a Swin checkpoint was trained with: its first table has (2M−1)² rows."""
    rows = np.shape(params["layers_0_blocks_0"]["attn"][relative_positions.TABLE])[0]
    return (math.isqrt(rows) + 1) // 2


def checkpoint_image_size(params: dict[str, Any], model: SwinTransformer) -> int:
    """The image size a Swin checkpoint is used at unless one is given: the one whose last
    stage is one window (224 for window 7, 384 for window 12), as timm's models are named.
    Only the window is in the params (its tables' size); the resolution is not recorded."""
    window = checkpoint_window(params)
    return window * model.patch_size * 2 ** (len(model.depths) - 1)
