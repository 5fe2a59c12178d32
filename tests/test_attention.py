"""Tests of vit_jax.attention: rollout by hand, weights from a model, maps and the PNG overlay."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import attention, checkpoint, models

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CAT = DATA / "images" / "skimage_chelsea_cat.png"  # 451×300
needs_photo = pytest.mark.skipif(
    not CAT.is_file(), reason=f"test photo {CAT} not found (shared test data)"
)


def random_params(model, image_size: int, seed: int = 0) -> dict:
    """Random, non-zero params for every leaf; no compilation."""
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


# One layer, batch 1, two heads over two tokens. Rows are queries and sum to 1.
HEAD_0 = [[1.0, 0.0], [0.5, 0.5]]
HEAD_1 = [[0.0, 1.0], [0.5, 0.5]]
LAYER_1 = np.array([[HEAD_0, HEAD_1]])  # [batch 1, heads 2, 2, 2]
# Mean of the heads: [[0.5, 0.5], [0.5, 0.5]]; + I: [[1.5, 0.5], [0.5, 1.5]]; rows / 2:
ROLLED_1 = [[0.75, 0.25], [0.25, 0.75]]
# A second layer, one head: every query attends to token 0 only.
LAYER_2 = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])
# + I: [[2, 0], [1, 1]]; rows / 2: Ã2 = [[1, 0], [0.5, 0.5]].
# Rollout = Ã2 · Ã1 = [[1·0.75 + 0·0.25, 1·0.25 + 0·0.75],
#                      [0.5·0.75 + 0.5·0.25, 0.5·0.25 + 0.5·0.75]]
ROLLED_2 = [[0.75, 0.25], [0.5, 0.5]]
# (The other order, Ã1 · Ã2, would be [[0.875, 0.125], [0.625, 0.375]].)


def test_rollout_of_one_layer_by_hand():
    np.testing.assert_allclose(attention.attention_rollout([LAYER_1]), [ROLLED_1], atol=1e-12)


def test_rollout_of_two_layers_puts_the_later_layer_on_the_left():
    rollout = attention.attention_rollout([LAYER_1, LAYER_2])
    np.testing.assert_allclose(rollout, [ROLLED_2], atol=1e-12)
    assert not np.allclose(rollout, [[[0.875, 0.125], [0.625, 0.375]]])


def test_rollout_of_three_tokens_by_hand():
    # One head: tokens 0 and 1 attend to themselves, token 2 uniformly to all three.
    layer = np.array([[[[1, 0, 0], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3]]]])
    # + I: [[2, 0, 0], [0, 2, 0], [1/3, 1/3, 4/3]]; every row sums to 2:
    expected = [[[1, 0, 0], [0, 1, 0], [1 / 6, 1 / 6, 2 / 3]]]
    np.testing.assert_allclose(attention.attention_rollout([layer]), expected, atol=1e-12)
    # Twice: [1/6, 1/6, 2/3] · Ã = [1/6 + 2/3 · 1/6, 1/6 + 2/3 · 1/6, 2/3 · 2/3]
    twice = attention.attention_rollout(np.stack([layer, layer]))  # one [L, B, H, T, T] array
    np.testing.assert_allclose(twice[0, 2], [5 / 18, 5 / 18, 4 / 9], atol=1e-12)


def test_rollout_rows_sum_to_one_and_stacked_equals_list():
    logits = np.random.default_rng(0).standard_normal((3, 2, 4, 6, 6))  # [L, B, H, T, T]
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    rollout = attention.attention_rollout(weights)
    assert rollout.shape == (2, 6, 6)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(rollout, attention.attention_rollout(list(weights)))


def test_rollout_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one layer"):
        attention.attention_rollout([])
    with pytest.raises(ValueError, match=r"Layer 0: .*\[batch, heads, tokens, tokens\]"):
        attention.attention_rollout([np.ones((2, 3, 3))])
    with pytest.raises(ValueError, match="Layer 1 has 3 tokens, the layers before it 2"):
        attention.attention_rollout([LAYER_1, np.ones((1, 1, 3, 3)) / 3])


def test_model_rollout_from_intermediates_scanned_or_not():
    model = models.get_model(
        "testing", num_classes=3, patches={"size": (8, 8)}, transformer={"num_layers": 2}
    )
    params = random_params(model, 32)  # 4×4 grid + class token = 17 tokens
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    weights = attention.attention_weights(model, params, images)
    assert [w.shape for w in weights] == [(2, 2, 17, 17)] * 2
    np.testing.assert_allclose(np.sum(weights, axis=-1), 1.0, atol=1e-5)
    rollout = attention.attention_rollout(weights)
    assert rollout.shape == (2, 17, 17)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)

    scanned = models.get_model(
        "testing", num_classes=3, patches={"size": (8, 8)}, transformer={"num_layers": 2}, scan=True
    )
    scanned_weights = attention.attention_weights(scanned, checkpoint.scan_params(params), images)
    np.testing.assert_allclose(np.stack(scanned_weights), np.stack(weights), atol=1e-5)

    heat = attention.cls_attention_map(rollout, attention.grid_shape(model, 32))
    assert heat.shape == (2, 4, 4)


def test_distilled_map_averages_the_class_and_distillation_rows():
    # Batch 1: class token, distillation token, 2×2 patches (the rollout of a distilled model).
    rollout = np.array(
        [
            [
                [0.2, 0.1, 0.1, 0.2, 0.3, 0.1],
                [0.1, 0.3, 0.3, 0.1, 0.1, 0.1],
                *np.eye(6)[2:],
            ]
        ]
    )
    heat = attention.cls_attention_map(rollout, (2, 2), has_class_token=2)
    np.testing.assert_allclose(heat, [[[0.2, 0.15], [0.2, 0.1]]])  # mean of rows 0, 1; cols 2:
    model = models.get_model(
        "testing", num_classes=3, patches={"size": (8, 8)}, distilled=True, activation="gelu"
    )
    params = random_params(model, 32)  # 4×4 grid + class and distillation tokens = 18 tokens
    images = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    rollout = attention.attention_rollout(attention.attention_weights(model, params, images))
    assert rollout.shape == (1, 18, 18)
    heat = attention.cls_attention_map(rollout, attention.grid_shape(model, 32), has_class_token=2)
    np.testing.assert_allclose(heat[0], rollout[0, :2, 2:].mean(axis=0).reshape(4, 4))


def test_fused_attention_has_no_weights_to_roll_out():
    model = models.get_model("testing", num_classes=3, attention_impl="xla")
    with pytest.raises(ValueError, match=r"attention_impl='xla'.*attention_impl='flax'"):
        attention.attention_weights(model, random_params(model, 16), np.zeros((1, 16, 16, 3)))


def test_cls_attention_map_token_and_gap():
    # Batch 1, class token + 2×2 patches.
    rollout = np.array(
        [
            [
                [0.2, 0.1, 0.2, 0.3, 0.2],
                [0.0, 1.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 1.0],
            ]
        ]
    )
    token = attention.cls_attention_map(rollout, (2, 2))
    np.testing.assert_allclose(token, [[[0.1, 0.2], [0.3, 0.2]]])
    # Without a class token (gap): the mean of all 4 rows of a 4-token rollout.
    gap_rollout = rollout[:, 1:, 1:].copy()
    gap_rollout[0, 0] = [0.4, 0.2, 0.2, 0.2]
    gap = attention.cls_attention_map(gap_rollout, (2, 2), has_class_token=False)
    # columns: (0.4 + 0 + 0 + 0) / 4, (0.2 + 1) / 4, (0.2 + 1) / 4, (0.2 + 1) / 4
    np.testing.assert_allclose(gap, [[[0.1, 0.3], [0.3, 0.3]]])
    with pytest.raises(ValueError, match=r"Grid 3×3 has 9 patches, but the rollout has 4"):
        attention.cls_attention_map(rollout, (3, 3))


@needs_photo
def test_save_overlay_writes_a_png_of_the_image_size(tmp_path):
    with Image.open(CAT) as photo:
        image = photo.convert("RGB")
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0  # hottest at the top-left, cold elsewhere
    path = tmp_path / "overlay.png"
    attention.save_overlay(path, image, heat, alpha=0.6)
    with Image.open(path) as written:
        assert written.format == "PNG"
        assert written.size == image.size == (451, 300)
        pixels = np.asarray(written.convert("RGB"), np.float64)
    original = np.asarray(image, np.float64)
    # Map value 1 → white heat, 0 → black: pixel = 0.4 · image + 0.6 · heat colour.
    np.testing.assert_allclose(pixels[0, 0], np.round(0.4 * original[0, 0] + 0.6 * 255), atol=1)
    np.testing.assert_allclose(pixels[-1, -1], np.round(0.4 * original[-1, -1]), atol=1)
    # The same picture from a uint8 array and from the model's [-1, 1] floats.
    from_array = np.asarray(attention.overlay(np.asarray(image), heat, alpha=0.6))
    np.testing.assert_array_equal(from_array, pixels)
    floats = np.asarray(image, np.float32) / 127.5 - 1.0
    from_floats = np.asarray(attention.overlay(floats, heat, alpha=0.6), np.float64)
    np.testing.assert_allclose(from_floats, pixels, atol=1)


def _attention_command_line(tmp_path, out, *args: str, checkpoint_arg: str = "") -> int:
    """`attention.main` for a random tiny ViT (8 px patches, 32 px) saved in `tmp_path`."""
    model = models.get_model("testing", num_classes=3, patches={"size": (8, 8)})
    ckpt = tmp_path / "params.npz"
    checkpoint.save(random_params(model, 32), ckpt)
    overrides = '{"patches": {"size": [8, 8]}}'
    return attention.main(
        [
            *(f"--checkpoint={checkpoint_arg or ckpt}", "--model=testing"),
            *(f"--overrides={overrides}", f"--out={out}", *args),
        ]
    )


@needs_photo
def test_command_line_writes_the_map_over_the_image(tmp_path, capsys):
    out = tmp_path / "map.png"
    code = _attention_command_line(tmp_path, out, str(CAT), checkpoint_arg=str(tmp_path))
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as written:
        assert written.size == (451, 300)
    assert (
        attention.main(
            ["--checkpoint=/nonexistent.npz", "--model=testing", "--out=x.png", str(CAT)]
        )
        == 2
    )
    assert "Checkpoint not found" in capsys.readouterr().err


def test_the_overlay_of_a_jpeg_shows_the_pixels_the_model_sees(tmp_path, capsys):
    """The overlay's picture is the file as evaluation decodes it: TF's `decode_jpeg` pixels."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    smooth = np.asarray(small.resize((48, 40), Image.Resampling.BICUBIC), np.float64)
    noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(noisy).save(jpeg, quality=90)
    out = tmp_path / "map.png"
    code = _attention_command_line(tmp_path, out, "--alpha=0", str(jpeg))  # the picture alone
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as written:
        pixels = np.asarray(written.convert("RGB"))
    reference = tf.io.decode_jpeg(jpeg.read_bytes(), channels=3).numpy()
    np.testing.assert_array_equal(pixels, reference)
    with Image.open(jpeg) as photo:  # what Pillow decodes differs (IDCT, upsampling)
        assert np.mean(np.asarray(photo.convert("RGB")) != reference) > 0.3


@pytest.mark.parametrize("name", ["testing-swin", "testing-beit", "Mixer-B_16"])
def test_attention_maps_refuse_models_other_than_vit_with_one_error(name):
    model = models.get_model(name, num_classes=10)
    with pytest.raises(ValueError, match=r"for ViT and DeiT models .*Use a ViT or DeiT model"):
        attention.attention_weights(model, {}, np.zeros((1, 16, 16, 3), np.float32))
