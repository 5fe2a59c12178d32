"""The ResNet stem of the hybrid ViTs (R50+ViT-B_16, R26+ViT-S_32, ...).

Weight-standardised convolutions, GroupNorm and post-activation bottleneck units, with the
released checkpoints' names (`conv_root`, `gn_root`, `block{k}/unit{j}/...`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STD_CONV_EPSILON = 1e-5  # added to the standard deviation, not the variance.


def weight_standardize(w: jax.Array, axis: tuple[int, ...], eps: float) -> jax.Array:
    """(w - mean) / (std + eps) over `axis`."""
    w = w - jnp.mean(w, axis=axis)
    return w / (jnp.std(w, axis=axis) + eps)


class StdConv(nn.Conv):
    """Conv whose kernel is standardised over (H, W, in) on every forward pass."""

    def param(self, name: str, *args, **kwargs):
        param = super().param(name, *args, **kwargs)
        if name == "kernel":
            param = weight_standardize(param, axis=(0, 1, 2), eps=STD_CONV_EPSILON)
        return param


class ResidualUnit(nn.Module):
    """Bottleneck unit (1×1 → 3×3 (strided) → 1×1, 4× expansion), post-activation."""

    features: int
    strides: tuple[int, int] = (1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        needs_projection = x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1)
        residual = x
        if needs_projection:
            residual = StdConv(
                features=self.features * 4,
                kernel_size=(1, 1),
                strides=self.strides,
                use_bias=False,
                dtype=self.dtype,
                name="conv_proj",
            )(residual)
            residual = nn.GroupNorm(dtype=self.dtype, name="gn_proj")(residual)

        y = StdConv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(nn.GroupNorm(dtype=self.dtype, name="gn1")(y))
        y = StdConv(
            self.features,
            (3, 3),
            strides=self.strides,
            use_bias=False,
            dtype=self.dtype,
            name="conv2",
        )(y)
        y = nn.relu(nn.GroupNorm(dtype=self.dtype, name="gn2")(y))
        y = StdConv(self.features * 4, (1, 1), use_bias=False, dtype=self.dtype, name="conv3")(y)
        y = nn.GroupNorm(dtype=self.dtype, scale_init=nn.initializers.zeros, name="gn3")(y)
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`block_size` units; the first one carries the stage's stride."""

    block_size: int
    nout: int
    first_stride: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResidualUnit(self.nout, strides=self.first_stride, dtype=self.dtype, name="unit1")(x)
        for i in range(1, self.block_size):
            x = ResidualUnit(self.nout, strides=(1, 1), dtype=self.dtype, name=f"unit{i + 1}")(x)
        return x


def stem_stride(num_stages: int) -> int:
    """Total downsampling: 4 from the root, then 2 for every stage after the first."""
    return 4 * 2 ** max(num_stages - 1, 0)


def resnet_stem(
    x: jax.Array, *, num_layers: tuple[int, ...], width_factor: float, dtype: Any = jnp.float32
) -> jax.Array:
    """Root (StdConv 7×7/2 → GroupNorm → ReLU → max-pool 3×3/2) and the bottleneck stages.

    Call inside a compact `__call__`: the modules are created in the caller's scope, so their
    parameters sit at the caller's top level (`conv_root`, `gn_root`, `block1`, ...), as in the
    released hybrid checkpoints.
    """
    width = int(64 * width_factor)
    x = StdConv(width, (7, 7), strides=(2, 2), use_bias=False, dtype=dtype, name="conv_root")(x)
    x = nn.relu(nn.GroupNorm(dtype=dtype, name="gn_root")(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(num_layers):
        x = ResNetStage(
            block_size=block_size,
            nout=width * 2**i,
            first_stride=(1, 1) if i == 0 else (2, 2),
            dtype=dtype,
            name=f"block{i + 1}",
        )(x)
    return x
