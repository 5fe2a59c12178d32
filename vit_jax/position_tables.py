"""Position tables of a new resolution: the resampling fine-tuning and prediction share.

A ViT's learned position table (1, special rows + grid rows, D) is tied to the patch grid it was
trained at. Fine-tuning at another resolution (`checkpoint.load_pretrained`) and predicting at
one (`checkpoint_geometry`) resample its grid rows as the original does (corner-aligned
bilinear, per channel) and carry its special rows (class, distillation token) across.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or parameter tree that cannot be used as it is (`vit_jax.checkpoint`)."""


def resample_grid(grid: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w, D) grid to (h', w', D) with corners aligned.

    Output index i samples input coordinate i·(n_in−1)/(n_out−1) (0 when n_out is 1), the
    same numbers as `scipy.ndimage.zoom(grid, (h'/h, w'/w, 1), order=1)`. Computed in float64,
    returned in the input dtype.
    """
    grid = np.asarray(grid)
    out = grid.astype(np.float64)
    for axis, n_out in enumerate(new_shape):
        out = _linear_resize_axis(out, axis, int(n_out))
    return out.astype(grid.dtype)


def _linear_resize_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    coords = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    low = np.clip(np.floor(coords).astype(int), 0, n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = coords - low
    shape = [1] * x.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def special_rows(params: Mapping[str, Any]) -> int:
    """Leading position-table rows before the patch grid: class token, distillation token."""
    return int("cls" in params) + int("dist_token" in params)


def interpolate_posembed(
    posemb: np.ndarray,
    num_tokens: int,
    has_class_token: bool | int,
    *,
    new_has_class_token: bool | int | None = None,
    old_grid_shape: tuple[int, int] | None = None,
    new_grid_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resamples a (1, N, D) position table to `num_tokens` rows.

    The class row (row 0, when `has_class_token`) is split off, the rest is reshaped to its grid,
    resized per channel with corner-aligned bilinear interpolation (`resample_grid`), flattened,
    and the class row is put back in front: the original algorithm and numbers for square grids.

    Beyond the original:
      * non-square grids: pass `old_grid_shape` / `new_grid_shape` as (rows, cols); a grid that
        is not square without them is an error;
      * `new_has_class_token` (default: `has_class_token`) converts between tables with and
        without the class row. Going token → no token drops the class row. Going no token →
        token prepends a zero row: no learned row exists, and zero leaves the class token with no
        positional bias until fine-tuning learns one.
      * two special rows (a distilled model's class and distillation tokens): pass the number
        of leading rows, 0, 1 or 2, as `has_class_token` / `new_has_class_token` (`special_rows`
        counts a tree's). The first rows the two tables share are kept in order; a row the new
        table has beyond the old one's is zero (as above), one the old has beyond the new is
        dropped (2 → 1 keeps the class row, drops the distillation row).
    `num_tokens` counts the special rows of the new table.
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise CheckpointError(f"Position table must have shape (1, N, D), got {posemb.shape}.")
    new_has_class_token = has_class_token if new_has_class_token is None else new_has_class_token
    old_special, new_special = int(has_class_token), int(new_has_class_token)
    for count in (old_special, new_special):
        if count not in (0, 1, 2):
            raise CheckpointError(f"A position table has 0, 1 or 2 special rows, not {count}.")
    special, grid = posemb[:, :old_special], posemb[0, old_special:]
    new_grid_tokens = num_tokens - new_special
    old_shape = _grid_shape(len(grid), old_grid_shape, "old")
    new_shape = _grid_shape(new_grid_tokens, new_grid_shape, "new")
    grid = resample_grid(grid.reshape(*old_shape, -1), new_shape).reshape(1, new_grid_tokens, -1)
    special = special[:, :new_special]
    padding = np.zeros((1, new_special - special.shape[1], grid.shape[-1]), grid.dtype)
    return np.concatenate([special.astype(grid.dtype), padding, grid], axis=1)


def _grid_shape(tokens: int, given: tuple[int, int] | None, which: str) -> tuple[int, int]:
    if given is not None:
        rows, cols = (int(d) for d in given)
        if rows * cols != tokens:
            raise CheckpointError(
                f"The {which} grid shape {(rows, cols)} has {rows * cols} cells, but the {which} "
                f"position table has {tokens} grid rows (class/distillation rows excluded)."
            )
        return rows, cols
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(
            f"The {which} position table has {tokens} grid rows (special rows excluded), which is "
            f"not a square grid; pass {which}_grid_shape=(rows, cols)."
        )
    return side, side
