"""BEiT against timm: converted random weights give timm's logits, at 224 px and after the
224 → 384 resampling of the relative position tables (timm's checkpoint filter)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests import _compiled
from tests._torchvision_shim import require_timm
from vit_jax import demo, models, relative_positions, timm_weights

torch, timm = require_timm()

# Measured max |Δlogit| 7.5e-8 at 224 px and 1.6e-7 at 384 px (timm 1.0.31, torch CPU, fp32).
ATOL = 1e-4


def _randomized(img_size: int):
    """A 2-block beit_base at `img_size` with noise on every tensor (timm starts its tables,
    q/v biases at zero, which would hide a mis-mapping)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "beit_base_patch16_224", pretrained=False, depth=2, num_classes=7, img_size=img_size
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def _logits(model, images):
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def test_converted_beit_gives_timms_logits_at_224_and_resampled_at_384():
    theirs = _randomized(224)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    params = timm_weights.convert(state, "BEiT-B_16", num_layers=2)
    ours = models.get_model("BEiT-B_16", num_classes=7, num_layers=2)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    want = _logits(theirs, images)
    assert np.abs(want).max() > 0.1
    got = np.asarray(_compiled.apply(ours, params, images))
    assert np.abs(got - want).max() <= ATOL

    bigger = timm.create_model(
        "beit_base_patch16_224", pretrained=False, depth=2, num_classes=7, img_size=384
    ).eval()
    bigger.load_state_dict(timm.models.beit.checkpoint_filter_fn(theirs.state_dict(), bigger))
    expected = jax.eval_shape(
        lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 384, 384, 3)), train=False)
    )["params"]
    resized, changes = relative_positions.resize_relative_tables(params, expected)
    assert len(changes) == 2 and "(732, 12) → (2212, 12)" in changes[0]
    table, old = (t["blocks_0"]["attn"][relative_positions.TABLE] for t in (resized, params))
    np.testing.assert_array_equal(table[-3:], old[-3:])  # the class-token rows carried across
    images = np.random.default_rng(1).uniform(-1, 1, (1, 384, 384, 3)).astype(np.float32)
    got = np.asarray(_compiled.apply(ours, resized, images))
    assert np.abs(got - _logits(bigger, images)).max() <= ATOL


def test_relative_position_index_with_the_class_token_equals_timms():
    from timm.layers import gen_relative_position_index

    want = gen_relative_position_index((3, 4), class_token=True).numpy()
    np.testing.assert_array_equal(
        relative_positions.relative_position_index(3, 4, class_token=True), want
    )
    index = relative_positions.relative_position_index(2, 2, class_token=True)
    # 3×3 offsets (rows 0–8), then class→patch 9, patch→class 10, class→class 11; query (0,0)
    # to key (0,1) is Δ = (0, −1): (0+1)·3 + (−1+1) = 3.
    assert index[0, 0] == 11 and set(index[0, 1:]) == {9} and set(index[1:, 0]) == {10}
    assert index[1, 2] == 3 and index[1, 1] == 4


def test_zoo_beit_counts_equal_timms():
    for name, timm_name in (("BEiT-B_16", "beit_base_patch16_224"),
                            ("BEiT-L_16", "beit_large_patch16_224")):  # fmt: skip
        theirs = timm.create_model(timm_name, pretrained=False, device="meta")
        count = sum(int(np.prod(p.shape)) for p in theirs.parameters())
        assert demo.parameter_count(name) == count
