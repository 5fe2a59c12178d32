"""Self-supervised pretraining models around the project's own ViT: MAE and masked patches.

Both wrap a `VisionTransformer` built without a head (`num_classes=0`, every token returned),
so the encoder's parameters are the released ViT tree, name for name, under `encoder`:

- `MaskedAutoencoder` (He et al. 2021): the encoder sees the class token and a random 25 % of
  the patches (`random_masking`); the decoder (`decoder/...`) gets them projected to its width,
  a shared learned mask token at every masked position, a fixed 2-D sin-cos position table,
  a few transformer blocks, LayerNorm and a Dense to each patch's p·p·3 pixels.
- `MaskedPatchPredictor` (the ViT paper, appendix B.1.2): half of the patch embeddings are
  corrupted (`mpp_corruption`: 80 % a learned `mask_token`, 10 % another patch's embedding,
  10 % unchanged) and a Dense head (`mpp_head`) predicts each patch's target from its output
  token: the 3-bit mean colour (512 classes), the 3-bit colours of its 4×4 downsized version
  (16 × 512), or its pixels (L2).

`vit_jax.encoder_tree` takes the encoder out of such a tree for fine-tuning or export and
names what it leaves behind, so a pretraining head is never merged into another model silently.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models_vit

MPP_TARGETS = {"mean_color": 1, "color_4x4": 16, "pixels": 0}  # predictions of 512 per patch
COLOR_BITS = 3
COLORS = 2 ** (3 * COLOR_BITS)  # 512
EVAL_MASK_SEED = 0  # evaluation masks the same patches every time (a comparable loss)


# ----------------------------------------------------------------------------------------------
# Patches, masks and targets (pure functions, tested by hand).


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[n, H, W, C] → [n, (H/p)·(W/p), p·p·C], patches in row-major order, pixels (y, x, c)."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
    """The inverse of `patchify` for a (rows, cols) patch grid."""
    n, channels = patches.shape[0], patches.shape[-1] // (patch * patch)
    x = patches.reshape(n, grid[0], grid[1], patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid[0] * patch, grid[1] * patch, channels)


class Masking(NamedTuple):
    """One random masking per example: what MAE's encoder keeps and how to undo the shuffle."""

    keep: jax.Array  # [n, K] patch indices the encoder sees, in shuffled order
    restore: jax.Array  # [n, N] position of each patch in (kept ++ masked) order
    mask: jax.Array  # [n, N] 1.0 where the patch is masked (hidden from the encoder)


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many patches MAE's encoder sees: int(N · (1 − ratio)), at least one."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_masking(key: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Masking:
    """MAE's per-example masking: the patches of the smallest uniform noise are kept."""
    keep_count = kept_patches(num_patches, mask_ratio)
    noise = jax.random.uniform(key, (batch, num_patches))
    shuffle = jnp.argsort(noise, axis=1)
    restore = jnp.argsort(shuffle, axis=1)
    mask = (restore >= keep_count).astype(jnp.float32)
    return Masking(keep=shuffle[:, :keep_count], restore=restore, mask=mask)


def unshuffle(kept: jax.Array, filler: jax.Array, restore: jax.Array) -> jax.Array:
    """Kept tokens [n, K, D] and fillers for the rest [n, N−K, D] back in patch order."""
    shuffled = jnp.concatenate([kept, filler], axis=1)
    return jnp.take_along_axis(shuffled, restore[..., None], axis=1)


class Corruption(NamedTuple):
    """Masked patch prediction's corruption of one batch of patch embeddings."""

    corrupted: jax.Array  # [n, N] 1.0 for the patches whose target is predicted (exactly half)
    use_mask_token: jax.Array  # [n, N] bool: replaced by the [mask] embedding
    source: jax.Array  # [n, N] flat index (over the batch's n·N patches) of the embedding used


def mpp_corruption(
    key: jax.Array,
    batch: int,
    num_patches: int,
    corrupt_ratio: float = 0.5,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> Corruption:
    """Exactly round(ratio·N) patches per example are corrupted; each of them is replaced by
    the mask token (p = `mask_fraction`), by another patch of the batch (p =
    `random_fraction`; never itself) or left as it is (the rest)."""
    pick, kind, other = jax.random.split(key, 3)
    count = round(num_patches * corrupt_ratio)
    order = jnp.argsort(jax.random.uniform(pick, (batch, num_patches)), axis=1)
    corrupted = jnp.argsort(order, axis=1) < count
    u = jax.random.uniform(kind, (batch, num_patches))
    use_mask = corrupted & (u < mask_fraction)
    use_other = corrupted & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
    total = batch * num_patches
    own = jnp.arange(total).reshape(batch, num_patches)
    # Another patch: an offset in [1, total) from its own index, so never the patch itself.
    shifted = (own + jax.random.randint(other, (batch, num_patches), 1, max(total, 2))) % total
    source = jnp.where(use_other, shifted, own)
    return Corruption(corrupted.astype(jnp.float32), use_mask, source)


def color_targets(images: jax.Array, patch: int, cells: int = 1) -> jax.Array:
    """The 3-bit colour classes of each patch's `cells`×`cells` downsized version.

    `images` are the pipeline's [-1, 1] pixels. Each cell's mean R, G, B in [0, 1] is
    quantised to 3 bits (floor(8·v), 1.0 → 7) and the class is r·64 + g·8 + b, one of 512.
    Returns [n, N, cells²] integers.
    """
    n, h, w, _ = images.shape
    step = patch // cells
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    x = x.reshape(n, h // step, step, w // step, step, 3).mean(axis=(2, 4))  # the cells' colours
    levels = jnp.clip(jnp.floor(x * 2**COLOR_BITS), 0, 2**COLOR_BITS - 1).astype(jnp.int32)
    classes = (levels[..., 0] * 2 ** (2 * COLOR_BITS)) + levels[..., 1] * 2**COLOR_BITS
    classes = classes + levels[..., 2]  # [n, H/step, W/step]
    grid_h, grid_w = h // patch, w // patch
    classes = classes.reshape(n, grid_h, cells, grid_w, cells).transpose(0, 1, 3, 2, 4)
    return classes.reshape(n, grid_h * grid_w, cells * cells)


def sincos_2d(grid: tuple[int, int], width: int, class_token: bool = True) -> np.ndarray:
    """A fixed 2-D sin-cos position table [1, (1 +) rows·cols, width], as MAE's decoder uses.

    The first half of the channels encodes the row, the second the column (MAE's code puts the
    column first; the table is fixed and the decoder learns from scratch, so only the
    convention differs); each half is sin | cos of the
    coordinate times ω_k = 1 / 10000^(k / (width/4)), k < width/4. The class token's row is 0.
    """
    if width % 4:
        raise ValueError(f"The sin-cos table needs a width divisible by 4, got {width}.")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))

    def encode(coordinate: np.ndarray) -> np.ndarray:
        angles = coordinate.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    table = np.concatenate([encode(rows.astype(np.float64)), encode(cols.astype(np.float64))], 1)
    if class_token:
        table = np.concatenate([np.zeros((1, width)), table])
    return table[None].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The models.


def _grid(encoder: models_vit.VisionTransformer, images: jax.Array) -> tuple[int, int]:
    p = encoder.patch_size
    return images.shape[1] // p[0], images.shape[2] // p[1]


class MaeDecoder(nn.Module):
    """Encoded visible tokens → pixels of every patch (MAE's light-weight decoder)."""

    width: int = 512
    depth: int = 8
    num_heads: int = 16
    pixels: int = 768  # p·p·3
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, tokens: jax.Array, restore: jax.Array, grid: tuple[int, int]) -> jax.Array:
        n = tokens.shape[0]
        x = nn.Dense(self.width, name="embed")(tokens)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
        hidden = restore.shape[1] - (x.shape[1] - 1)
        filler = jnp.broadcast_to(mask_token, (n, hidden, self.width)).astype(x.dtype)
        x = jnp.concatenate([x[:, :1], unshuffle(x[:, 1:], filler, restore)], axis=1)
        x = x + jnp.asarray(sincos_2d(grid, self.width))
        for i in range(self.depth):
            x = models_vit.Encoder1DBlock(
                mlp_dim=self.mlp_ratio * self.width,
                num_heads=self.num_heads,
                dropout_rate=0.0,
                attention_dropout_rate=0.0,
                activation="gelu",
                name=f"block_{i}",
            )(x, True)
        x = nn.LayerNorm(epsilon=models_vit.LAYERNORM_EPSILON, name="norm")(x)
        return nn.Dense(self.pixels, name="pred")(x)[:, 1:].astype(jnp.float32)


class MaskedAutoencoder(nn.Module):
    """MAE: `encoder` (a headless, unpooled ViT) on the visible patches, `decoder` on all.

    `__call__(images, *, train, mask_key=None)` → (predicted patch pixels [n, N, p·p·3], mask
    [n, N]); without `mask_key` the mask is the fixed evaluation one (EVAL_MASK_SEED).
    """

    encoder: models_vit.VisionTransformer
    mask_ratio: float = 0.75
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, mask_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        grid = _grid(self.encoder, images)
        if mask_key is None:
            mask_key = jax.random.PRNGKey(EVAL_MASK_SEED)
        masking = random_masking(mask_key, images.shape[0], grid[0] * grid[1], self.mask_ratio)
        cls = jnp.zeros((images.shape[0], 1), masking.keep.dtype)
        keep = jnp.concatenate([cls, masking.keep + 1], axis=1)  # the class token is token 0
        tokens = self.encoder(images, train=train, keep=keep)
        p = self.encoder.patch_size
        decoder = MaeDecoder(
            width=self.decoder_width,
            depth=self.decoder_depth,
            num_heads=self.decoder_heads,
            pixels=p[0] * p[1] * 3,
            name="decoder",
        )
        return decoder(tokens, masking.restore, grid), masking.mask


class MaskedPatchPredictor(nn.Module):
    """Masked patch prediction: `encoder` on corrupted patch embeddings, `mpp_head` per token.

    `__call__(images, *, train, corruption_key=None)` → (outputs [n, N, outputs], corrupted
    [n, N]); `outputs` is 512·cells² (colour classes) or p·p·3 (pixels).
    """

    encoder: models_vit.VisionTransformer
    outputs: int = COLORS
    corrupt_ratio: float = 0.5
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, corruption_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        grid = _grid(self.encoder, images)
        if corruption_key is None:
            corruption_key = jax.random.PRNGKey(EVAL_MASK_SEED)
        n, patches = images.shape[0], grid[0] * grid[1]
        corruption = mpp_corruption(
            corruption_key,
            n,
            patches,
            self.corrupt_ratio,
            self.mask_fraction,
            self.random_fraction,
        )
        width = self.encoder.hidden_size
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, width))

        def corrupt(x: jax.Array) -> jax.Array:
            flat = x.reshape(n * patches, width)
            x = jnp.take(flat, corruption.source.reshape(-1), axis=0).reshape(x.shape)
            return jnp.where(corruption.use_mask_token[..., None], mask_token.astype(x.dtype), x)

        tokens = self.encoder(images, train=train, patch_fn=corrupt)
        outputs = nn.Dense(self.outputs, name="mpp_head")(tokens[:, 1:])
        return outputs.astype(jnp.float32), corruption.corrupted
