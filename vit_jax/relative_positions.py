"""Relative position bias tables (Swin, BEiT): their index, and their resampling to a new size.

A Swin window of M×M tokens, or a BEiT patch grid of M×M, has a learned table of (2M−1)² rows
(one per relative offset (Δrow, Δcol) between a query and a key, Δrow the slow axis), one
column per head. BEiT's tables have 3 more rows after those: class token → patches, patches →
class token, class token → itself.

Fine-tuning at a larger window (Swin 224/w7 → 384/w12) or grid (BEiT 224 → 384) resamples each
table as the BEiT authors and timm do (`resize_bias_table`): the old offsets are spread
geometrically so that they reach the new table's edge, and every new integer offset is read by
bilinear interpolation; the 3 class-token rows are carried across unchanged. The relative index
is not a parameter: the models rebuild it for their size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

TABLE = "relative_position_bias_table"
CLASS_TOKEN_ROWS = 3  # BEiT: class → patch, patch → class, class → class


def relative_position_index(rows: int, cols: int, class_token: bool = False) -> np.ndarray:
    """[N, N] indices into the table, N = rows·cols (+ 1 with `class_token`).

    Grid tokens i (query) and j (key) in row-major order get (Δrow + rows−1)·(2·cols−1) +
    (Δcol + cols−1), Δ = position of i − position of j. With `class_token` the class token is
    token 0: its row (as query) reads table row T, its column (as key) T + 1 and the class
    token with itself T + 2, T = (2·rows−1)·(2·cols−1).
    """
    r, c = (a.reshape(-1) for a in np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"))
    grid = (r[:, None] - r[None, :] + rows - 1) * (2 * cols - 1) + (
        c[:, None] - c[None, :] + cols - 1
    )
    if not class_token:
        return grid
    offsets = (2 * rows - 1) * (2 * cols - 1)
    index = np.zeros((grid.shape[0] + 1,) * 2, grid.dtype)
    index[1:, 1:] = grid
    index[0, :] = offsets
    index[:, 0] = offsets + 1
    index[0, 0] = offsets + 2
    return index


def table_rows(window: int, class_token: bool = False) -> int:
    """Rows of the table of an M×M window or grid."""
    return (2 * window - 1) ** 2 + (CLASS_TOKEN_ROWS if class_token else 0)


def _source_offsets(src: int, dst: int) -> np.ndarray:
    """The old table's offsets spread geometrically so that its half-width covers the new
    one's: 1, 1 + q, 1 + q + q², … with q found by bisection (BEiT's scheme)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    offsets, current = [], 1.0
    for i in range(src // 2):
        offsets.append(current)
        current += q ** (i + 1)
    return np.array([-o for o in reversed(offsets)] + [0.0] + offsets)


def _split_rows(rows: int) -> tuple[int, int]:
    """(side of the offset grid, class-token rows) of a table with `rows` rows.

    The offset grid is (2M−1)², always odd; BEiT's 3 extra rows make the total even.
    """
    for extra in (0, CLASS_TOKEN_ROWS):
        side = math.isqrt(max(rows - extra, 0))
        if side % 2 == 1 and side * side == rows - extra:
            return side, extra
    raise ValueError(
        f"A relative position bias table has (2M-1)² rows (+ {CLASS_TOKEN_ROWS} class-token "
        f"rows for BEiT), got {rows}."
    )


def resize_bias_table(table: np.ndarray, new_rows: int) -> np.ndarray:
    """A (rows, heads) table → (new_rows, heads): per head, the old offset grid placed at
    `_source_offsets` and read by bilinear interpolation (clamped at the edges) at the new
    integer offsets; BEiT's class-token rows are kept as they are."""
    table = np.asarray(table)
    src, extra = _split_rows(table.shape[0])
    dst, new_extra = _split_rows(new_rows)
    if extra != new_extra:
        raise ValueError(
            f"Cannot resize a relative position table of {table.shape[0]} rows ({extra} "
            f"class-token rows) to {new_rows} ({new_extra}): one is BEiT's, the other Swin's."
        )
    if src == dst:
        return table
    points = _source_offsets(src, dst)
    targets = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    grid = table[: src * src].astype(np.float64).reshape(src, src, -1)
    # Along the rows (Δrow) for every old column, then along the columns (Δcol).
    rows = np.stack([[np.interp(targets, points, grid[:, c, h]) for c in range(src)]
                     for h in range(grid.shape[-1])])  # fmt: skip  # [heads, old col, new row]
    out = np.stack([[np.interp(targets, points, rows[h, :, r]) for r in range(dst)]
                    for h in range(grid.shape[-1])])  # fmt: skip  # [heads, new row, new col]
    out = out.transpose(1, 2, 0).reshape(dst * dst, -1)
    return np.concatenate([out, table[src * src :]], axis=0).astype(table.dtype)


def resize_relative_tables(
    params: Mapping[str, Any], expected: Mapping[str, Any]
) -> tuple[Any, list[str]]:
    """`params` with each relative position table resized to its shape in `expected`.

    Returns the tree and one line per resized table (path, old → new shape) for the log.
    Other leaves, and tables `expected` lacks, are left for the strict tree check.
    """
    changes: list[str] = []
    shapes = {
        _path(p): tuple(np.shape(leaf))
        for p, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
        if _path(p).endswith(TABLE)
    }

    def fit(path, leaf):
        name = _path(path)
        want = shapes.get(name)
        if want is None or tuple(np.shape(leaf)) == want:
            return leaf
        changes.append(f"{name} {tuple(np.shape(leaf))} → {want}")
        return resize_bias_table(np.asarray(leaf), want[0])

    return jax.tree_util.tree_map_with_path(fit, dict(params)), changes


def _path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)
