"""Swin Transformer: windows, shift masks and relative positions by hand; sizes refused.

The logit equality with timm's Swin is in tests/test_interop_timm_swin.py (the interop extra).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _compiled
from vit_jax import models_swin, timm_weights

M = models_swin.MASK_VALUE


def test_relative_position_index_of_a_2x2_window_by_hand():
    # Tokens (0,0), (0,1), (1,0), (1,1); index = (Δrow + 1)·3 + (Δcol + 1).
    expected = [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    np.testing.assert_array_equal(models_swin.relative_position_index(2), expected)
    index = models_swin.relative_position_index(7)
    assert index.shape == (49, 49) and index.min() == 0 and index.max() == 13**2 - 1
    np.testing.assert_array_equal(np.diag(index), np.full(49, 84))  # Δ = 0: the table's centre


def test_shift_mask_of_a_4x4_map_in_2x2_windows_by_hand():
    # Shift 1: regions of the rolled 4x4 map (bands [0,2), [2,3), [3,4) per axis)
    #   0 0 1 2
    #   0 0 1 2
    #   3 3 4 5
    #   6 6 7 8
    # Window tokens in row-major order; two tokens attend only within one region.
    mask = models_swin.shift_mask(4, 2, 1)
    assert mask.shape == (4, 4, 4)
    np.testing.assert_array_equal(mask[0], np.zeros((4, 4)))  # one region
    same = {1: [1, 2, 1, 2], 2: [3, 3, 6, 6], 3: [4, 5, 7, 8]}
    for window, regions in same.items():
        r = np.array(regions)
        np.testing.assert_array_equal(mask[window], np.where(r[:, None] == r[None, :], 0.0, M))
    assert mask[1][0, 2] == 0 and mask[1][0, 1] == M


def test_windows_partition_and_reverse():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    windows = models_swin.window_partition(x, 2)
    assert windows.shape == (2 * 6, 4, 3)
    np.testing.assert_array_equal(windows[1], x[0, 0:2, 2:4].reshape(4, 3))  # row 0, col 1
    np.testing.assert_array_equal(models_swin.window_reverse(windows, 2, 4, 6), x)
    # A stage no larger than the window is one unshifted window (Swin-T's last, 7 × 7).
    assert models_swin.stage_window(7, 7, 3) == (7, 0)
    assert models_swin.stage_window(14, 7, 3) == (7, 3)


def test_image_sizes_the_windows_cannot_tile_are_refused():
    model = models_swin.get_swin("Swin-T_4_w7", num_classes=3)
    with pytest.raises(ValueError, match=r"Image size 200 does not tile .* multiple of 224"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 200, 200, 3)), train=False)
    models_swin.check_image_size(448, (2, 2, 6, 2), 7)  # 112, 56, 28, 14: all multiples of 7
    models_swin.check_image_size(384, (2, 2, 18, 2), 12)
    with pytest.raises(ValueError, match="use a multiple of 384"):
        models_swin.check_image_size(224, (2, 2, 18, 2), 12)
    with pytest.raises(ValueError, match="Unknown Swin model 'Swin-X'"):
        models_swin.get_swin("Swin-X")


def test_drop_path_changes_training_outputs_only():
    model = models_swin.SwinTransformer(  # features: the head starts at zero
        num_classes=0, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4,
        drop_path_rate=0.5,
    )  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
    params = _compiled.init_params(model, x)
    plain = model.clone(drop_path_rate=0.0)
    plain_out = _compiled.apply(plain, params, x)
    np.testing.assert_allclose(_compiled.apply(model, params, x), plain_out)
    dropped = _compiled.apply(model, params, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(dropped, plain_out)


def test_the_converter_names_every_unknown_key():
    with pytest.raises(ValueError, match=r"1 unknown key.*absolute_pos_embed"):
        timm_weights.convert(
            {"absolute_pos_embed": np.zeros((1, 4, 8)), "norm.weight": np.ones(8)},
            "testing-swin",
        )
