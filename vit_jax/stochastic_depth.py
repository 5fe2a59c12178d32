"""Stochastic depth ("drop path") for the ViT encoder blocks, as the DeiT and MAE recipes train.

In training, each residual branch (attention, MLP) of each block is dropped for a random subset
of the samples: the branch's output is zeroed for those samples, so they pass through the block
on the residual path alone, and multiplied by 1/(1 - rate) for the others, which keeps its
expected value. The rate grows linearly with depth, from 0 at the first block to
`drop_path_rate` at the last (DeiT's `linspace(0, rate, depth)`): early blocks, whose features
every later block builds on, are dropped least.

The masks come from one 'dropout' key per encoder pass, split into one key per layer by the
encoder. Scanned and unrolled encoders therefore draw the same masks for the same rng (a key
per layer is a scanned input, not a per-iteration split of the scan's rng), and so do
rematerialised blocks when they recompute.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

# A (rates, keys) pair: the per-layer drop rates (float32, shape (layers,)) and the per-layer
# PRNG keys (shape (layers,)), or one layer's slice of both.
LayerDrops = tuple[jax.Array, jax.Array]


def check_drop_path_rate(rate: object) -> None:
    """ValueError unless `rate` is a real number in [0, 1) (1 would drop every branch always)."""
    valid = (
        isinstance(rate, numbers.Real)
        and not isinstance(rate, bool)
        and math.isfinite(rate)
        and 0.0 <= rate < 1.0
    )
    if not valid:
        raise ValueError(
            f"drop_path_rate must be a float in [0, 1): the stochastic-depth rate of the last "
            f"encoder block (0, the default, turns it off; DeiT-B uses 0.1); got {rate!r}."
        )


def drop_path_rates(rate: float, num_layers: int) -> np.ndarray:
    """Block i of L drops with rate·i/(L-1): 0 for the first block, `rate` for the last.

    A single block gets 0 (as `linspace(0, rate, 1)`), so a 1-layer model never drops.
    """
    return np.linspace(0.0, rate, num_layers, dtype=np.float64).astype(np.float32)


def layer_drops(key: jax.Array, rate: float, num_layers: int) -> LayerDrops:
    """The per-layer rates and keys of one encoder pass, stacked along a leading layer axis."""
    return jnp.asarray(drop_path_rates(rate, num_layers)), jax.random.split(key, num_layers)


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zeroes `x` for a fraction `rate` of the samples (axis 0), scales the rest by 1/(1-rate).

    Returns the result (in x's dtype) and the boolean keep mask, shape (batch,). `rate` may be
    a traced scalar (it is a scanned input under `nn.scan`); a rate of 0 keeps every sample
    unscaled, as `uniform < 1` always holds.
    """
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],))
    mask = keep.reshape((-1,) + (1,) * (x.ndim - 1))
    scaled = x.astype(jnp.float32) / keep_prob
    return jnp.where(mask, scaled, 0.0).astype(x.dtype), keep
