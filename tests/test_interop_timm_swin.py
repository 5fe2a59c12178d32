"""Swin against timm: the same logits from converted random weights; the zoo's parameter counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _compiled
from tests._torchvision_shim import require_timm
from vit_jax import demo, models_swin, timm_weights

torch, timm = require_timm()
from timm.models import swin_transformer as timm_swin  # noqa: E402

# Measured max |Δlogit| 1.8e-7 for logits of magnitude ~0.6 (timm 1.0.31, torch CPU, fp32).
ATOL = 1e-5


def _randomized(model):
    """timm's init plus noise on every tensor (its zero biases would hide a mis-mapping)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize(("image", "window"), [(56, 7), (64, 4)], ids=["w7-shift+whole", "w4"])
def test_converted_random_weights_give_timms_logits(image, window):
    """Stage 1 uses shifted windows with the mask; at 56 px / window 7, stage 2 (7 × 7 tokens)
    is one unshifted window, as in Swin-T's last stage."""
    size = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=window)
    theirs = _randomized(
        timm_swin.SwinTransformer(img_size=image, patch_size=4, num_classes=5, **size)
    )
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    params = timm_weights.convert(
        state, "testing-swin", image_size=image, patch_size=4, input_norm="inception", **size
    )
    ours = models_swin.SwinTransformer(num_classes=5, input_norm="inception", **size)
    expected = jax.eval_shape(
        lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, image, image, 3)), train=False)
    )["params"]
    assert jax.tree.map(lambda a: a.shape, expected) == jax.tree.map(np.shape, params)
    images = np.random.default_rng(1).uniform(-1, 1, (3, image, image, 3)).astype(np.float32)
    got = np.asarray(_compiled.apply(ours, params, images))
    with torch.no_grad():
        want = theirs(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() <= ATOL


@pytest.mark.parametrize("name", list(models_swin.SWIN_CONFIGS))
def test_zoo_parameter_counts_equal_timms(name):
    timm_name = models_swin.TIMM_NAMES[name]
    theirs = timm.create_model(timm_name, pretrained=False, device="meta")
    count = sum(math.prod(p.shape) for p in theirs.parameters())
    image = 384 if name.endswith("w12") else 224
    assert demo.count_parameters(models_swin.get_swin(name), image) == count


def test_a_new_window_resamples_the_bias_tables_as_timm_does():
    """56 px / window 7 → 96 px / window 12 (as 224/w7 → 384/w12): timm's checkpoint filter
    resizes every table 13² → 23²; ours give the same logits."""
    size = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    old = _randomized(
        timm_swin.SwinTransformer(img_size=56, patch_size=4, num_classes=5, window_size=7, **size)
    )
    state = {k: v.detach() for k, v in old.state_dict().items()}
    new = timm_swin.SwinTransformer(
        img_size=96, patch_size=4, num_classes=5, window_size=12, **size
    )
    new.load_state_dict(timm_swin.checkpoint_filter_fn(state, new), strict=False)
    new.eval()
    ours = models_swin.SwinTransformer(
        num_classes=5, window_size=12, input_norm="inception", **size
    )
    params = timm_weights.convert(
        {k: v.numpy() for k, v in state.items()}, "testing-swin", image_size=56, patch_size=4,
        window_size=7, **size,
    )  # fmt: skip
    params = models_swin.resample_for(params, ours, 96)
    table = params["layers_0_blocks_1"]["attn"]["relative_position_bias_table"]
    assert table.shape == (23 * 23, 2)
    images = np.random.default_rng(2).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    got = np.asarray(_compiled.apply(ours, params, images))
    with torch.no_grad():
        want = new(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() <= 1e-4  # measured 6e-8
