"""Model tests: zoo parameter counts, pinned parameter trees, golden numerics, options, errors.

The golden tests compare the Flax models with an independent NumPy forward pass written from the
original implementation's behaviour (its modules, numerics and parameter names), run on random
parameters (every leaf re-drawn, including the zero-initialised head, so nothing cancels
trivially). Big models are only ever traced with
`jax.eval_shape`; everything that runs uses tiny models and 16-32 px images.
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vit_jax import checkpoint, matmul_precision, models, models_vit, stochastic_depth
from vit_jax.models_mixer import MlpMixer
from vit_jax.models_vit import VisionTransformer

# ----------------------------------------------------------------------------------------------
# Helpers.


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} for every leaf of a (possibly abstract) parameter tree."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def param_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def abstract_init(model, image_shape, **kwargs):
    """Parameter tree (ShapeDtypeStructs) and output shape, without allocating anything."""
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros(image_shape, jnp.float32), train=False, **kwargs
        )
    )
    return variables["params"], out


def rng_key(seed: int) -> jax.Array:
    """A PRNG key; 'rbg' compiles several times faster than the default threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def init_params(model, image_shape, seed=0):
    """Real initial values (jitted: far faster than an eager init)."""
    init = jax.jit(functools.partial(model.init, train=False))
    return init(rng_key(seed), jnp.zeros(image_shape))["params"]


def random_params(model, image_shape, seed):
    """Random params in the model's layout (no init needed: every leaf is re-drawn)."""
    return randomize(abstract_init(model, image_shape)[0], seed)


# The token embeddings (patch/stem projection, class token, position table) are drawn small, so
# the first LayerNorm sees a variance of ~1e-3 and its epsilon (1e-6, not 1e-5) shows in the
# outputs well above the fp32 tolerance; everything else keeps activations O(1).
TOKEN_SCALE = 0.03


def randomize(params, seed: int):
    """Draws every leaf (float32) anew with a fixed numpy seed (zero-init leaves included).

    Takes real or abstract (ShapeDtypeStruct) leaves: only names and shapes are read.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        shape = leaf.shape
        if name.endswith("scale"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(("bias", "cls", "dist_token", "pos_embedding")):
            value = 0.2 * rng.standard_normal(shape)
        else:  # kernels: (..., in, out), or (D, heads, head_dim) for query/key/value
            qkv = name.endswith(("query/kernel", "key/kernel", "value/kernel"))
            fan_in = shape[0] if qkv else math.prod(shape[:-1])
            value = rng.standard_normal(shape) / math.sqrt(fan_in)
        tokens = ("embedding/", "stem/", "cls", "dist_token")
        if name.startswith(tokens) or name.endswith("pos_embedding"):
            value = TOKEN_SCALE * value
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, flax.core.unfreeze(params))


def to_numpy64(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def images(shape, seed=1) -> np.ndarray:
    """Float32 images in [-1, 1], as the model expects (x / 127.5 - 1)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape)
    return (pixels / 127.5 - 1.0).astype(np.float32)


def jitted_apply(model, mutable=False):
    if mutable:
        return jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
    return jax.jit(functools.partial(model.apply, train=False))


def logits(model, params, x) -> np.ndarray:
    return np.asarray(jitted_apply(model)({"params": params}, x))


def tiny_vit(**overrides) -> VisionTransformer:
    kwargs = dict(
        num_classes=5,
        patches={"size": (4, 4)},
        hidden_size=12,
        transformer=dict(
            num_layers=2, mlp_dim=24, num_heads=3, dropout_rate=0.0, attention_dropout_rate=0.0
        ),
        classifier="token",
    )
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def tiny_hybrid(**overrides) -> VisionTransformer:
    # width 64 * 0.5 = 32 channels, so every GroupNorm (32 groups) has >= 1 channel per group.
    kwargs = dict(
        num_classes=5,
        patches={"size": (1, 1)},
        hidden_size=16,
        transformer=dict(
            num_layers=1, mlp_dim=32, num_heads=2, dropout_rate=0.0, attention_dropout_rate=0.0
        ),
        resnet=dict(num_layers=(1, 1), width_factor=0.5),
        classifier="token",
    )
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def tiny_mixer(**overrides) -> MlpMixer:
    kwargs = dict(
        patches={"size": (8, 8)},
        num_classes=5,
        num_blocks=2,
        hidden_dim=16,
        tokens_mlp_dim=8,
        channels_mlp_dim=32,
    )
    kwargs.update(overrides)
    return MlpMixer(**kwargs)


# Non-square image and grid (4 x 6 patches), so a transposed patch order would show.
VIT_IMAGE = (2, 16, 24, 3)
HYBRID_IMAGE = (2, 32, 32, 3)
MIXER_IMAGE = (2, 32, 24, 3)

# ----------------------------------------------------------------------------------------------
# 1. The zoo: exact parameter counts (the original's models_test.py; num_classes=1000, 224 px).

EXPECTED_PARAM_COUNTS = {
    "testing": 21_390,
    "testing-unpooled": 21_370,
    "ViT-Ti_16": 5_717_416,
    "ViT-S_16": 22_050_664,
    "ViT-S_32": 22_878_952,
    "ViT-B_16": 86_567_656,
    "ViT-B_32": 88_224_232,
    "ViT-B_8": 86_576_872,
    "ViT-L_16": 304_326_632,
    "ViT-L_32": 306_535_400,
    "ViT-H_14": 632_045_800,
    "ViT-S_16-gap-norep": 22_049_896,
    "ViT-S_32-gap-norep": 22_878_184,
    "ViT-B_16-gap-norep": 86_566_120,
    "ViT-B_32-gap-norep": 88_222_696,
    "R+ViT-Ti_16": 6_337_704,
    "R26+ViT-S_32": 36_431_912,
    "R26+ViT-B_32": 101_383_976,
    "R50+ViT-B_16": 98_659_112,
    "R50+ViT-L_32": 328_994_856,
    "Mixer-B_16": 59_880_472,
    "Mixer-B_32": 60_293_428,
    "Mixer-L_16": 208_196_168,
    # DeiT: timm's deit_{tiny,small,base}_patch16_224 and deit_*_distilled_patch16_224 at 1000
    # classes (the distilled ones add dist_token D, a position row D and head_dist (D+1)·1000).
    "DeiT-Ti_16": 5_717_416,
    "DeiT-S_16": 22_050_664,
    "DeiT-B_16": 86_567_656,
    "DeiT-Ti_16-dist": 5_910_800,
    "DeiT-S_16-dist": 22_436_432,
    "DeiT-B_16-dist": 87_338_192,
    # Swin and BEiT: timm's swin_*_patch4_window{7_224,12_384} (at 384 px for window 12) and
    # beit_{base,large}_patch16_224 (timm 1.0.31, `sum(p.numel())`); the tiny ones ours.
    "testing-swin": 58_988,
    "Swin-T_4_w7": 28_288_354,
    "Swin-S_4_w7": 49_606_258,
    "Swin-B_4_w7": 87_768_224,
    "Swin-B_4_w12": 87_903_584,
    "Swin-L_4_w7": 196_532_476,
    "Swin-L_4_w12": 196_735_516,
    "testing-beit": 150_872,
    "BEiT-B_16": 86_530_984,
    "BEiT-L_16": 304_430_568,
}


def test_zoo_has_exactly_the_reference_models():
    assert sorted(models.MODEL_CONFIGS) == sorted(EXPECTED_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAM_COUNTS))
def test_zoo_param_count(name):
    model = models.get_model(name, num_classes=1000)
    size = models.default_image_size(name)
    params, out = abstract_init(model, (1, size, size, 3))
    assert param_count(params) == EXPECTED_PARAM_COUNTS[name]
    if name == "testing-unpooled":
        assert out.shape == (1, 14 * 14, 1000)
    else:
        assert out.shape == (1, 1000)
    assert out.dtype == jnp.float32


def test_r_ti_16_is_really_32_px_patches():
    # The original's R+ViT-Ti_16: the ResNet root only (/4) and patch 8, so a 7 x 7 grid at 224 px.
    params, _ = abstract_init(models.get_model("R+ViT-Ti_16", num_classes=10), (1, 224, 224, 3))
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 7 * 7, 192)
    assert not any(k.startswith("block") for k in params)


# ----------------------------------------------------------------------------------------------
# 2. Full parameter trees (the released files' names, Linen numbering).


def _block_shapes(prefix: str, d: int, heads: int, mlp: int) -> dict[str, tuple[int, ...]]:
    hd = d // heads
    attn = f"{prefix}/MultiHeadDotProductAttention_0"
    return {
        f"{prefix}/LayerNorm_0/scale": (d,),
        f"{prefix}/LayerNorm_0/bias": (d,),
        f"{attn}/query/kernel": (d, heads, hd),
        f"{attn}/query/bias": (heads, hd),
        f"{attn}/key/kernel": (d, heads, hd),
        f"{attn}/key/bias": (heads, hd),
        f"{attn}/value/kernel": (d, heads, hd),
        f"{attn}/value/bias": (heads, hd),
        f"{attn}/out/kernel": (heads, hd, d),
        f"{attn}/out/bias": (d,),
        f"{prefix}/LayerNorm_1/scale": (d,),
        f"{prefix}/LayerNorm_1/bias": (d,),
        f"{prefix}/MlpBlock_0/Dense_0/kernel": (d, mlp),
        f"{prefix}/MlpBlock_0/Dense_0/bias": (mlp,),
        f"{prefix}/MlpBlock_0/Dense_1/kernel": (mlp, d),
        f"{prefix}/MlpBlock_0/Dense_1/bias": (d,),
    }


# `testing` at 32 px: hidden 10, mlp 10, 2 heads, 1 layer, patch 16 → 2 x 2 grid + cls.
TESTING_TREE_32PX = {
    "embedding/kernel": (16, 16, 3, 10),
    "embedding/bias": (10,),
    "cls": (1, 1, 10),
    "Transformer/posembed_input/pos_embedding": (1, 5, 10),
    "Transformer/encoderblock_0/LayerNorm_0/scale": (10,),
    "Transformer/encoderblock_0/LayerNorm_0/bias": (10,),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel": (10, 2, 5),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/bias": (2, 5),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/kernel": (10, 2, 5),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/bias": (2, 5),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/value/kernel": (10, 2, 5),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/value/bias": (2, 5),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel": (2, 5, 10),
    "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/bias": (10,),
    "Transformer/encoderblock_0/LayerNorm_1/scale": (10,),
    "Transformer/encoderblock_0/LayerNorm_1/bias": (10,),
    "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": (10, 10),
    "Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias": (10,),
    "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel": (10, 10),
    "Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias": (10,),
    "Transformer/encoder_norm/scale": (10,),
    "Transformer/encoder_norm/bias": (10,),
    "head/kernel": (10, 1000),
    "head/bias": (1000,),
}


def test_testing_model_param_tree():
    params, _ = abstract_init(models.get_model("testing", num_classes=1000), (1, 32, 32, 3))
    assert flat_shapes(params) == TESTING_TREE_32PX
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_param_tree_variants():
    base = {k: v for k, v in TESTING_TREE_32PX.items() if not k.startswith("head/")}
    # num_classes 0 / None: no head.
    for num_classes in (0, None):
        params, _ = abstract_init(
            models.get_model("testing", num_classes=num_classes), (1, 32, 32, 3)
        )
        assert flat_shapes(params) == base
    # representation_size: a `pre_logits` Dense, and the head reads its output.
    params, _ = abstract_init(
        models.get_model("testing", num_classes=7, representation_size=6), (1, 32, 32, 3)
    )
    assert flat_shapes(params) == {
        **base,
        "pre_logits/kernel": (10, 6),
        "pre_logits/bias": (6,),
        "head/kernel": (6, 7),
        "head/bias": (7,),
    }
    # gap / unpooled: no class token, so the position table has h*w rows only.
    for classifier in ("gap", "unpooled"):
        params, _ = abstract_init(
            models.get_model("testing", num_classes=7, classifier=classifier), (1, 32, 32, 3)
        )
        expected = {k: v for k, v in base.items() if k != "cls"}
        expected["Transformer/posembed_input/pos_embedding"] = (1, 4, 10)
        assert flat_shapes(params) == {**expected, "head/kernel": (10, 7), "head/bias": (7,)}
    # token_unpooled keeps the class token.
    params, _ = abstract_init(
        models.get_model("testing", num_classes=7, classifier="token_unpooled"), (1, 32, 32, 3)
    )
    assert flat_shapes(params) == {**base, "head/kernel": (10, 7), "head/bias": (7,)}


def _gn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}/scale": (c,), f"{prefix}/bias": (c,)}


def _unit_shapes(prefix: str, cin: int, features: int, proj: bool) -> dict:
    shapes = {
        f"{prefix}/conv1/kernel": (1, 1, cin, features),
        **_gn(f"{prefix}/gn1", features),
        f"{prefix}/conv2/kernel": (3, 3, features, features),
        **_gn(f"{prefix}/gn2", features),
        f"{prefix}/conv3/kernel": (1, 1, features, 4 * features),
        **_gn(f"{prefix}/gn3", 4 * features),
    }
    if proj:
        shapes[f"{prefix}/conv_proj/kernel"] = (1, 1, cin, 4 * features)
        shapes.update(_gn(f"{prefix}/gn_proj", 4 * features))
    return shapes


def test_hybrid_param_tree():
    # Stages (1, 1), width 32: root → 32 ch; block1 → 128 ch (/1); block2 → 256 ch (/2).
    # 32 px: /2 root conv, /2 max-pool, /2 block2 → 4 x 4 grid of 1 x 1 patches + cls.
    params, out = abstract_init(tiny_hybrid(), HYBRID_IMAGE)
    expected = {
        "conv_root/kernel": (7, 7, 3, 32),
        **_gn("gn_root", 32),
        **_unit_shapes("block1/unit1", 32, 32, proj=True),
        **_unit_shapes("block2/unit1", 128, 64, proj=True),
        "embedding/kernel": (1, 1, 256, 16),
        "embedding/bias": (16,),
        "cls": (1, 1, 16),
        "Transformer/posembed_input/pos_embedding": (1, 17, 16),
        **_block_shapes("Transformer/encoderblock_0", 16, 2, 32),
        **_gn("Transformer/encoder_norm", 16),
        "head/kernel": (16, 5),
        "head/bias": (5,),
    }
    assert flat_shapes(params) == expected
    assert out.shape == (2, 5)
    # A second unit in a stage keeps channels and stride: no projection.
    params, _ = abstract_init(
        tiny_hybrid(resnet=dict(num_layers=(2,), width_factor=0.5)), HYBRID_IMAGE
    )
    shapes = flat_shapes(params)
    block1 = {k: v for k, v in shapes.items() if k.startswith("block1/")}
    assert block1 == {
        **_unit_shapes("block1/unit1", 32, 32, proj=True),
        **_unit_shapes("block1/unit2", 128, 32, proj=False),
    }


def test_mixer_param_tree():
    params, out = abstract_init(tiny_mixer(), MIXER_IMAGE)
    tokens = (32 // 8) * (24 // 8)
    expected = {"stem/kernel": (8, 8, 3, 16), "stem/bias": (16,)}
    for i in range(2):
        p = f"MixerBlock_{i}"
        expected.update(
            {
                **_gn(f"{p}/LayerNorm_0", 16),
                f"{p}/token_mixing/Dense_0/kernel": (tokens, 8),
                f"{p}/token_mixing/Dense_0/bias": (8,),
                f"{p}/token_mixing/Dense_1/kernel": (8, tokens),
                f"{p}/token_mixing/Dense_1/bias": (tokens,),
                **_gn(f"{p}/LayerNorm_1", 16),
                f"{p}/channel_mixing/Dense_0/kernel": (16, 32),
                f"{p}/channel_mixing/Dense_0/bias": (32,),
                f"{p}/channel_mixing/Dense_1/kernel": (32, 16),
                f"{p}/channel_mixing/Dense_1/bias": (16,),
            }
        )
    expected.update({**_gn("pre_head_layer_norm", 16), "head/kernel": (16, 5), "head/bias": (5,)})
    assert flat_shapes(params) == expected
    assert out.shape == (2, 5)


def test_initial_values():
    model = models.get_model(
        "testing",
        num_classes=3,
        head_bias_init=-10.0,
        hidden_size=64,
        transformer=dict(num_heads=4, mlp_dim=128),
    )
    params = init_params(model, (1, 128, 128, 3))  # 8 x 8 grid.
    np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["head"]["bias"], -10.0)
    np.testing.assert_array_equal(params["cls"], 0.0)
    np.testing.assert_array_equal(params["embedding"]["bias"], 0.0)
    block = params["Transformer"]["encoderblock_0"]
    for name in ("query", "key", "value", "out"):
        np.testing.assert_array_equal(block["MultiHeadDotProductAttention_0"][name]["bias"], 0.0)
    np.testing.assert_array_equal(block["LayerNorm_0"]["scale"], 1.0)
    mlp_bias = np.asarray(block["MlpBlock_0"]["Dense_0"]["bias"])
    assert 0 < np.abs(mlp_bias).max() < 1e-5  # normal(stddev=1e-6)
    mlp_kernel = np.abs(block["MlpBlock_0"]["Dense_0"]["kernel"])  # xavier_uniform (64, 128)
    bound = math.sqrt(6 / (64 + 128))
    assert 0.95 * bound < mlp_kernel.max() <= bound
    embedding = np.asarray(params["embedding"]["kernel"])  # lecun normal, fan_in 16 * 16 * 3
    assert 0.95 < embedding.std() * math.sqrt(16 * 16 * 3) < 1.05
    posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    assert posemb.shape == (1, 65, 64)
    assert 0.018 < posemb.std() < 0.022  # normal(stddev=0.02), 4160 draws
    # Hybrid: the last GroupNorm of each unit starts at zero scale.
    hybrid = init_params(tiny_hybrid(), HYBRID_IMAGE)
    np.testing.assert_array_equal(hybrid["block1"]["unit1"]["gn3"]["scale"], 0.0)
    np.testing.assert_array_equal(hybrid["block1"]["unit1"]["gn2"]["scale"], 1.0)
    # Mixer head is zero too.
    mixer = init_params(tiny_mixer(), MIXER_IMAGE)
    np.testing.assert_array_equal(mixer["head"]["kernel"], 0.0)


# ----------------------------------------------------------------------------------------------
# 3. Output shapes for every classifier, head / no head, with and without pre_logits.


@pytest.mark.parametrize("classifier", models_vit.CLASSIFIERS)
@pytest.mark.parametrize("num_classes", [7, 0, None])
@pytest.mark.parametrize("representation_size", [None, 6])
def test_output_shapes(classifier, num_classes, representation_size):
    model = models.get_model(
        "testing",
        num_classes=num_classes,
        classifier=classifier,
        representation_size=representation_size,
    )
    params, out = abstract_init(model, (3, 32, 48, 3))  # 2 x 3 grid of 16 px patches
    width = num_classes or representation_size or 10
    expected = {
        "token": (3, width),
        "gap": (3, width),
        "unpooled": (3, 6, width),
        "token_unpooled": (3, 7, width),
    }[classifier]
    assert out.shape == expected
    assert out.dtype == jnp.float32
    assert ("head" in params) == bool(num_classes)
    assert ("pre_logits" in params) == (representation_size is not None)


# ----------------------------------------------------------------------------------------------
# 4. Golden numerics: an independent NumPy forward pass (float64) vs the Flax model (float32).


def np_layernorm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased variance
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_patch_embed(x, p):
    """Conv with kernel = stride = patch, VALID: a reshape into patches and one matmul."""
    kernel = p["kernel"]
    ph, pw, c, d = kernel.shape
    n, hh, ww, _ = x.shape
    gh, gw = hh // ph, ww // pw
    patches = x.reshape(n, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, gh * gw, ph * pw * c)  # row-major grid: row by row
    return patches @ kernel.reshape(ph * pw * c, d) + p["bias"]


def np_attention(x, p, heads):
    d = x.shape[-1]
    head_dim = d // heads
    q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("btd,dhk->bthk", x, p["value"]["kernel"]) + p["value"]["bias"]
    weights = np_softmax(np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(head_dim))
    out = np.einsum("bhqt,bthk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def np_encoder_block(x, p, heads, gelu=np_gelu_tanh):
    x = x + np_attention(
        np_layernorm(x, p["LayerNorm_0"]), p["MultiHeadDotProductAttention_0"], heads
    )
    y = np_layernorm(x, p["LayerNorm_1"])
    y = np_dense(gelu(np_dense(y, p["MlpBlock_0"]["Dense_0"])), p["MlpBlock_0"]["Dense_1"])
    return x + y


def np_vit(
    p,
    x,
    *,
    heads,
    num_layers,
    classifier,
    representation_size,
    num_classes,
    resnet_stages=None,
    gelu=np_gelu_tanh,
    distilled=False,
):
    """The reference forward pass; distilled: (class-token logits, distillation-token logits)."""
    x = np.asarray(x, np.float64)
    if resnet_stages is not None:
        x = np_resnet_stem(p, x, resnet_stages)
    x = np_patch_embed(x, p["embedding"])
    if classifier in ("token", "token_unpooled"):
        cls = np.broadcast_to(p["cls"], (x.shape[0], 1, x.shape[2]))
        x = np.concatenate([cls, x], axis=1)  # prepended, then the position table is added
    if distilled:
        dist = np.broadcast_to(p["dist_token"], (x.shape[0], 1, x.shape[2]))
        x = np.concatenate([x[:, :1], dist, x[:, 1:]], axis=1)  # right after the class token
    x = x + p["Transformer"]["posembed_input"]["pos_embedding"]
    for i in range(num_layers):
        x = np_encoder_block(x, p["Transformer"][f"encoderblock_{i}"], heads, gelu)
    x = np_layernorm(x, p["Transformer"]["encoder_norm"])
    if distilled:
        tokens = x[:, 0], x[:, 1]
        if representation_size is not None:
            tokens = [np.tanh(np_dense(t, p["pre_logits"])) for t in tokens]
        return np_dense(tokens[0], p["head"]), np_dense(tokens[1], p["head_dist"])
    if classifier == "token":
        x = x[:, 0]
    elif classifier == "gap":
        x = x.mean(axis=1)
    if representation_size is not None:
        x = np.tanh(np_dense(x, p["pre_logits"]))
    if num_classes:
        x = np_dense(x, p["head"])
    return x


# Hybrid stem (the original's models_resnet: BiT-style ResNet root and stages). The strided
# 'SAME' convolutions and the max-pool use lax primitives
# (in float32 at HIGHEST precision); standardisation, GroupNorm and the unit structure are here.


def np_standardize(w):
    mean = w.mean(axis=(0, 1, 2))
    std = w.std(axis=(0, 1, 2))
    return (w - mean) / (std + 1e-5)  # epsilon on the std, not the variance


def np_conv_same(x, w, stride):
    out = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return np.asarray(out, np.float64)


def np_std_conv(x, p, stride=1):
    return np_conv_same(x, np_standardize(p["kernel"]), stride)


def np_groupnorm(x, p, groups=32, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(n, h, w, c) * p["scale"] + p["bias"]


def np_relu(x):
    return np.maximum(x, 0.0)


def np_max_pool_3x3_s2_same(x):
    out = jax.lax.reduce_window(
        jnp.asarray(x, jnp.float32), -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME"
    )
    return np.asarray(out, np.float64)


def np_bottleneck(x, p, features, stride):
    residual = x
    if x.shape[-1] != 4 * features or stride != 1:
        residual = np_groupnorm(np_std_conv(x, p["conv_proj"], stride), p["gn_proj"])
    y = np_relu(np_groupnorm(np_std_conv(x, p["conv1"]), p["gn1"]))
    y = np_relu(np_groupnorm(np_std_conv(y, p["conv2"], stride), p["gn2"]))
    y = np_groupnorm(np_std_conv(y, p["conv3"]), p["gn3"])
    return np_relu(residual + y)  # post-activation


def np_resnet_stem(p, x, stages):
    width = p["conv_root"]["kernel"].shape[-1]
    x = np_relu(np_groupnorm(np_std_conv(x, p["conv_root"], stride=2), p["gn_root"]))
    x = np_max_pool_3x3_s2_same(x)
    for i, units in enumerate(stages):
        for j in range(units):
            stride = 2 if (i > 0 and j == 0) else 1
            x = np_bottleneck(x, p[f"block{i + 1}"][f"unit{j + 1}"], width * 2**i, stride)
    return x


def np_mixer(p, x, num_blocks, num_classes):
    x = np_patch_embed(np.asarray(x, np.float64), p["stem"])
    for i in range(num_blocks):
        b = p[f"MixerBlock_{i}"]
        y = np_layernorm(x, b["LayerNorm_0"]).swapaxes(1, 2)  # (batch, channels, tokens)
        tm = b["token_mixing"]
        y = np_dense(np_gelu_tanh(np_dense(y, tm["Dense_0"])), tm["Dense_1"])
        x = x + y.swapaxes(1, 2)
        y = np_layernorm(x, b["LayerNorm_1"])
        cm = b["channel_mixing"]
        x = x + np_dense(np_gelu_tanh(np_dense(y, cm["Dense_0"])), cm["Dense_1"])
    x = np_layernorm(x, p["pre_head_layer_norm"]).mean(axis=1)
    return np_dense(x, p["head"]) if num_classes else x


GOLDEN_ATOL = GOLDEN_RTOL = 1e-5


@pytest.mark.parametrize(
    "classifier, representation_size, num_classes",
    [
        ("token", None, 5),
        ("token", 8, 5),
        ("gap", None, 5),
        ("gap", 8, None),
        ("unpooled", None, 5),
        ("token_unpooled", 8, 5),
        ("token_unpooled", None, 0),
    ],
)
def test_vit_golden(classifier, representation_size, num_classes):
    model = tiny_vit(
        classifier=classifier, representation_size=representation_size, num_classes=num_classes
    )
    params = random_params(model, VIT_IMAGE, seed=0)
    x = images(VIT_IMAGE)
    got = logits(model, params, x)
    want = np_vit(
        to_numpy64(params),
        x,
        heads=3,
        num_layers=2,
        classifier=classifier,
        representation_size=representation_size,
        num_classes=num_classes,
    )
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.5  # the check is not against near-zero numbers
    np.testing.assert_allclose(got, want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)


def test_pre_logits_tanh_bounds_features():
    features = tiny_vit(num_classes=0, representation_size=8)
    params = random_params(features, VIT_IMAGE, seed=3)
    out = logits(features, params, images(VIT_IMAGE) * 50)  # saturate the tanh
    assert out.shape == (2, 8)
    assert np.abs(out).max() <= 1.0 and np.abs(out).max() > 0.9


def test_hybrid_golden():
    model = tiny_hybrid()
    params = random_params(model, HYBRID_IMAGE, seed=1)
    x = images(HYBRID_IMAGE)
    got = logits(model, params, x)
    want = np_vit(
        to_numpy64(params),
        x,
        heads=2,
        num_layers=1,
        classifier="token",
        representation_size=None,
        num_classes=5,
        resnet_stages=(1, 1),
    )
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)


def test_hybrid_golden_multi_unit_stage_without_projection():
    # Stage of 2 units: unit2 has no projection (identity residual). A faint image (contrast
    # 1e-3) gives the root GroupNorm a variance of ~1e-5, so its epsilon (1e-6) matters too.
    model = tiny_hybrid(resnet=dict(num_layers=(2,), width_factor=0.5), classifier="gap")
    shape = (1, 16, 16, 3)
    params = random_params(model, shape, seed=2)
    x = images(shape) * 1e-3
    want = np_vit(
        to_numpy64(params),
        x,
        heads=2,
        num_layers=1,
        classifier="gap",
        representation_size=None,
        num_classes=5,
        resnet_stages=(2,),
    )
    np.testing.assert_allclose(logits(model, params, x), want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)


@pytest.mark.parametrize("num_classes", [5, 0])
def test_mixer_golden(num_classes):
    model = tiny_mixer(num_classes=num_classes)
    params = random_params(model, MIXER_IMAGE, seed=4)
    x = images(MIXER_IMAGE)
    got = logits(model, params, x)
    want = np_mixer(to_numpy64(params), x, num_blocks=2, num_classes=num_classes)
    assert got.shape == (2, num_classes or 16)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)


# ----------------------------------------------------------------------------------------------
# 5. Options that must change neither the numbers nor the parameter tree.


@pytest.fixture(scope="module")
def vit_setup():
    """A tiny ViT with random params, its input and its fp32 'flax' logits."""
    model = tiny_vit(representation_size=8)
    params = random_params(model, VIT_IMAGE, seed=5)
    x = images(VIT_IMAGE)
    return model, params, x, logits(model, params, x)


@pytest.mark.parametrize("attention_impl", ["auto", "xla"])
def test_fused_attention_matches_flax(vit_setup, attention_impl):
    model, params, x, want = vit_setup
    fused = model.clone(attention_impl=attention_impl)
    tree, _ = abstract_init(fused, VIT_IMAGE)
    assert flat_shapes(tree) == flat_shapes(params)
    np.testing.assert_allclose(logits(fused, params, x), want, rtol=1e-5, atol=1e-5)


def _assert_same_grads(grads, want_grads, atol: float) -> None:
    assert grads.keys() == want_grads.keys()
    for key in want_grads:
        np.testing.assert_allclose(grads[key], want_grads[key], rtol=1e-5, atol=atol, err_msg=key)
    # The gradients are not trivially zero (the head was re-drawn too).
    assert np.abs(want_grads["Transformer/encoderblock_0/LayerNorm_0/scale"]).max() > 1e-3


def _logits_and_grads(model, params, x):
    """Logits and d(sum(logits * c))/d(params) for a fixed random cotangent c, in one compile."""
    cotangent = np.random.default_rng(0).standard_normal((x.shape[0], 5)).astype(np.float32)

    def loss(p):
        out = model.apply({"params": p}, x, train=False)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(out), flax.traverse_util.flatten_dict(grads, sep="/")


def _unscanned(grads: dict) -> dict:
    """Flat gradients of a scanned model in the unrolled layout."""
    tree = flax.traverse_util.unflatten_dict(grads, sep="/")
    return flax.traverse_util.flatten_dict(checkpoint.unscan_params(tree), sep="/")


def _relative_error(grads: dict, want_grads: dict) -> float:
    """Largest difference over all gradients, relative to the largest reference gradient."""
    assert grads.keys() == want_grads.keys()
    got, want = (np.concatenate([t[k].ravel() for k in sorted(t)]) for t in (grads, want_grads))
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def vit_grads(vit_setup):
    model, params, x, _ = vit_setup
    return _logits_and_grads(model, params, x)


@pytest.mark.parametrize("remat_policy", models_vit.REMAT_POLICIES)
def test_remat_policy_same_logits_and_grads(vit_setup, vit_grads, remat_policy):
    model, params, x, want = vit_setup
    remat = model.clone(remat_policy=remat_policy)
    tree, _ = abstract_init(remat, VIT_IMAGE)
    assert flat_shapes(tree) == flat_shapes(params)
    out, grads = _logits_and_grads(remat, params, x)
    want_out, want_grads = vit_grads
    np.testing.assert_allclose(want_out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads, want_grads, atol=1e-5)


def test_remat_with_dropout_is_identical(vit_setup):
    """Recomputation must replay the same dropout masks."""
    model, params, x, _ = vit_setup
    transformer = dict(
        num_layers=2, mlp_dim=24, num_heads=3, dropout_rate=0.2, attention_dropout_rate=0.2
    )
    base = model.clone(transformer=transformer)
    remat = base.clone(remat_policy="nothing_saveable")
    rng = {"dropout": rng_key(7)}

    def loss(m, p):
        return jnp.sum(m.apply({"params": p}, x, train=True, rngs=rng) ** 2)

    ref = jax.jit(jax.value_and_grad(functools.partial(loss, base)))(params)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat_policy", [None, "nothing_saveable"])
def test_scan_matches_unrolled(vit_setup, remat_policy):
    model, params, x, want = vit_setup
    scanned_model = model.clone(scan=True, remat_policy=remat_policy)
    scanned_params = checkpoint.scan_params(params)
    # The scanned model's own tree is the stacked layout scan_params produces.
    tree, _ = abstract_init(scanned_model, VIT_IMAGE)
    assert flat_shapes(tree) == flat_shapes(scanned_params)
    assert flat_shapes(tree)["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (2, 12, 24)
    assert not any("encoderblock_" in k for k in flat_shapes(tree))
    out, state = jitted_apply(scanned_model, mutable=True)({"params": scanned_params}, x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # Intermediates of the scanned blocks are stacked along a leading layer axis.
    (weights,) = state["intermediates"]["Transformer"]["encoderblock"][
        "MultiHeadDotProductAttention_0"
    ]["attention_weights"]
    _, unrolled = jitted_apply(model, mutable=True)({"params": params}, x)
    for i in range(2):
        (want_weights,) = unrolled["intermediates"]["Transformer"][f"encoderblock_{i}"][
            "MultiHeadDotProductAttention_0"
        ]["attention_weights"]
        np.testing.assert_allclose(weights[i], want_weights, rtol=1e-5, atol=1e-6)


# Measured on CPU (jax 0.10.2), error = max |bf16 - fp32| / max |fp32 logit|: 0.003 for these
# params and images; 0.003-0.034 over 12 random parameter/image seeds of this model (the small
# token embeddings make the first LayerNorm's input tiny, which bf16 handles worst). bf16 keeps 8
# mantissa bits (relative step 2^-8 ≈ 0.004). 0.1 is 3x the worst seed and 30x this case, yet a
# broken dtype path (missing cast, bf16 statistics overflowing) gives errors of order 1.
BF16_RELATIVE_TOLERANCE = 0.1


def test_bfloat16_compute(vit_setup):
    model, params, x, want = vit_setup
    bf16 = model.clone(dtype=jnp.bfloat16)
    tree, out = abstract_init(bf16, VIT_IMAGE)
    assert flat_shapes(tree) == flat_shapes(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(tree))
    assert out.dtype == jnp.float32
    got = jitted_apply(bf16)({"params": params}, x)
    assert got.dtype == jnp.float32
    rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert rel < BF16_RELATIVE_TOLERANCE, rel
    assert rel > 1e-4  # it really computed in bf16


def _rounded(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


# (lhs shape, rhs shape, dimension numbers) as the model's matmuls use them: a Dense, a Dense
# on tokens, the attention projections and the two attention products (Flax's einsums).
ROUNDED_DOT_CASES = [
    ((6, 5), (5, 4), (((1,), (0,)), ((), ()))),
    ((2, 6, 5), (5, 3, 4), (((2,), (0,)), ((), ()))),
    ((2, 6, 3, 4), (3, 4, 5), (((2, 3), (0, 1)), ((), ()))),
    ((2, 6, 3, 4), (2, 7, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),
    ((2, 3, 6, 7), (2, 7, 3, 4), (((3,), (1,)), ((0, 1), (0, 2)))),
    ((4, 2, 5, 3), (3, 6, 2, 4), (((0, 3), (3, 0)), ((1,), (2,)))),  # axes in any order
]


@pytest.mark.parametrize(("lhs_shape", "rhs_shape", "dims"), ROUNDED_DOT_CASES)
def test_rounded_dot_is_the_float32_product_of_rounded_values(lhs_shape, rhs_shape, dims):
    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (lhs_shape, rhs_shape))
    dot = matmul_precision.rounded_dot_general(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: dot(a, b, dims), lhs, rhs)
    want, want_vjp = jax.vjp(
        lambda a, b: jax.lax.dot_general(a, b, dims), _rounded(lhs), _rounded(rhs)
    )
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(out) - np.asarray(jax.lax.dot_general(lhs, rhs, dims))).max() > 1e-4
    grad = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    for got, expected in zip(vjp(grad), want_vjp(_rounded(grad)), strict=True):
        assert got.dtype == jnp.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _dot_dtypes(jaxpr) -> list[str]:
    """The operand dtype of every dot_general in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(str(eqn.invars[0].aval.dtype))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_dtypes(inner)
    return found


def test_matmul_dtype_rounds_the_encoder_matmuls(vit_setup, vit_grads):
    model, params, x, want = vit_setup
    bf16_dots = model.clone(matmul_dtype=jnp.bfloat16)
    tree, _ = abstract_init(bf16_dots, VIT_IMAGE)
    assert flat_shapes(tree) == flat_shapes(params)
    out, grads = _logits_and_grads(bf16_dots, params, x)
    rel = np.abs(out - want).max() / np.abs(want).max()
    assert 1e-4 < rel < BF16_RELATIVE_TOLERANCE, rel
    _, want_grads = vit_grads
    grad_rel = _relative_error(grads, want_grads)
    assert 1e-5 < grad_rel < BF16_RELATIVE_TOLERANCE, grad_rel  # over all (key bias grads are ~0)
    # Every block's 8 matmuls (q, k, v, out, q·kᵀ, weights·v, 2 MLP) take rounded operands.
    # The 6 projections run as bf16 multiplies in the forward pass; the two attention products
    # (a layout XLA:CPU cannot multiply in bf16) and the head and pre_logits run in float32.
    layers = model.transformer["num_layers"]
    forward = jax.make_jaxpr(lambda p: bf16_dots.apply({"params": p}, x, train=False))(params)
    dtypes = _dot_dtypes(forward.jaxpr)
    assert (dtypes.count("bfloat16"), dtypes.count("float32")) == (6 * layers, 2 * layers + 2)
    # Backward: the projections' input gradients are bf16 multiplies too.
    backward = jax.make_jaxpr(
        jax.grad(lambda p: bf16_dots.apply({"params": p}, x, train=False).sum())
    )(params)
    assert _dot_dtypes(backward.jaxpr).count("bfloat16") >= 2 * 6 * layers


@pytest.mark.parametrize(
    "options",
    [
        dict(scan=True, remat_policy="nothing_saveable"),
        dict(batch_chunks=2, attention_impl="xla"),
        dict(dtype=jnp.bfloat16),
    ],
    ids=lambda o: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in o.items()),
)
def test_matmul_dtype_combines_with_the_other_options(vit_setup, vit_grads, options):
    model, params, x, want = vit_setup
    combined = model.clone(matmul_dtype=jnp.bfloat16, **options)
    combined_params = checkpoint.scan_params(params) if options.get("scan") else params
    out, grads = _logits_and_grads(combined, combined_params, x)
    if options.get("scan"):
        grads = _unscanned(grads)
    assert np.abs(out - want).max() / np.abs(want).max() < BF16_RELATIVE_TOLERANCE
    _, want_grads = vit_grads
    assert _relative_error(grads, want_grads) < BF16_RELATIVE_TOLERANCE


@pytest.mark.parametrize("matmul_dtype", ["int8", "float8", jnp.int32])
def test_matmul_dtype_is_validated(matmul_dtype):
    with pytest.raises(ValueError, match="matmul_dtype must be None or a floating dtype"):
        abstract_init(tiny_vit(matmul_dtype=matmul_dtype), VIT_IMAGE)


# batch_chunks computes the same function on equal slices of the batch: outputs and gradients
# agree with the whole-batch reference to fp32 rounding (summation order).
@pytest.mark.parametrize(
    "options",
    [dict(batch_chunks=2), dict(batch_chunks=2, scan=True)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_batch_chunks_same_logits_and_grads(vit_setup, vit_grads, options):
    model, params, x, want = vit_setup
    chunked = model.clone(**options)
    chunked_params = checkpoint.scan_params(params) if options.get("scan") else params
    tree, _ = abstract_init(chunked, VIT_IMAGE)
    assert flat_shapes(tree) == flat_shapes(chunked_params)
    out, grads = _logits_and_grads(chunked, chunked_params, x)
    if options.get("scan"):
        grads = _unscanned(grads)
    _, want_grads = vit_grads
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads, want_grads, atol=5e-5)


def test_batch_chunks_keeps_initial_values(vit_setup):
    model, _, _, _ = vit_setup
    chunked = model.clone(batch_chunks=2)
    ref_init, chunked_init = init_params(model, VIT_IMAGE), init_params(chunked, VIT_IMAGE)
    flat_ref, flat_chunked = (
        flax.traverse_util.flatten_dict(t, sep="/") for t in (ref_init, chunked_init)
    )
    assert flat_ref.keys() == flat_chunked.keys()
    for key in flat_ref:
        np.testing.assert_array_equal(flat_chunked[key], flat_ref[key], err_msg=key)


@pytest.mark.parametrize("batch_chunks", [0, -1, 2.0, True, "2"])
def test_batch_chunks_is_validated(batch_chunks):
    with pytest.raises(ValueError, match="batch_chunks must be an integer >= 1"):
        abstract_init(tiny_vit(batch_chunks=batch_chunks), VIT_IMAGE)


# ----------------------------------------------------------------------------------------------
# 6. Named intermediates.


def test_intermediates(vit_setup):
    model, params, x, want = vit_setup
    out, state = jitted_apply(model, mutable=True)({"params": params}, x)
    np.testing.assert_array_equal(out, want)
    inter = flax.core.unfreeze(state["intermediates"])
    (encoded,) = inter["encoded"]
    # A sow named like the `pre_logits` module would collide with it, so the module sows its
    # own output (Flax's capture_intermediates layout).
    (pre_logits,) = inter["pre_logits"]["__call__"]
    assert encoded.shape == (2, 1 + 4 * 6, 12)  # per token, class token first
    assert pre_logits.shape == (2, 8)  # representation_size
    # pre_logits are the pooled class token through Dense + tanh, and equal the features model.
    p64 = to_numpy64(params)
    np.testing.assert_allclose(
        pre_logits,
        np.tanh(np_dense(np.asarray(encoded, np.float64)[:, 0], p64["pre_logits"])),
        rtol=1e-5,
        atol=1e-5,
    )
    features = model.clone(num_classes=0)
    no_head = {k: v for k, v in params.items() if k != "head"}
    np.testing.assert_allclose(logits(features, no_head, x), pre_logits, rtol=1e-6, atol=1e-6)
    for i in range(2):
        attn = inter["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]
        (weights,) = attn["attention_weights"]
        assert weights.shape == (2, 3, 25, 25)  # (batch, heads, tokens, tokens)
        assert (np.asarray(weights) >= 0).all()
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)


def test_attention_weights_match_reference(vit_setup):
    model, params, x, _ = vit_setup
    _, state = jitted_apply(model, mutable=True)({"params": params}, x)
    (weights,) = state["intermediates"]["Transformer"]["encoderblock_0"][
        "MultiHeadDotProductAttention_0"
    ]["attention_weights"]
    p = to_numpy64(params)
    h = np_patch_embed(np.asarray(x, np.float64), p["embedding"])
    h = np.concatenate([np.broadcast_to(p["cls"], (2, 1, 12)), h], axis=1)
    h = np_layernorm(
        h + p["Transformer"]["posembed_input"]["pos_embedding"],
        p["Transformer"]["encoderblock_0"]["LayerNorm_0"],
    )
    attn = p["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
    q = np.einsum("btd,dhk->bthk", h, attn["query"]["kernel"]) + attn["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", h, attn["key"]["kernel"]) + attn["key"]["bias"]
    want = np_softmax(np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(4))
    np.testing.assert_allclose(weights, want, rtol=1e-5, atol=1e-5)


def test_mixer_intermediates():
    model = tiny_mixer()
    params = random_params(model, MIXER_IMAGE, seed=6)
    x = images(MIXER_IMAGE)
    _, state = jitted_apply(model, mutable=True)({"params": params}, x)
    (pre_logits,) = state["intermediates"]["pre_logits"]["__call__"]
    want = np_mixer(to_numpy64(params), x, num_blocks=2, num_classes=0)
    np.testing.assert_allclose(pre_logits, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 7. Dropout.


def test_dropout_train_vs_eval_and_determinism(vit_setup):
    model, params, x, want = vit_setup
    dropout_model = model.clone(
        transformer=dict(
            num_layers=2, mlp_dim=24, num_heads=3, dropout_rate=0.3, attention_dropout_rate=0.3
        )
    )
    train_apply = jax.jit(functools.partial(dropout_model.apply, train=True))
    eval_out = logits(dropout_model, params, x)
    np.testing.assert_allclose(eval_out, want, rtol=1e-6, atol=1e-6)
    a = train_apply({"params": params}, x, rngs={"dropout": rng_key(0)})
    b = train_apply({"params": params}, x, rngs={"dropout": rng_key(0)})
    c = train_apply({"params": params}, x, rngs={"dropout": rng_key(1)})
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - eval_out).max() > 1e-2
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    # Without an rng, training with dropout is an error rather than silently deterministic.
    with pytest.raises(flax.errors.InvalidRngError):
        dropout_model.apply({"params": params}, x, train=True)


def test_attention_dropout_is_not_broadcast(vit_setup):
    """As in the original (flax attention): each example and head draws its own dropout mask."""
    model, params, x, _ = vit_setup
    attention_dropout_only = model.clone(
        transformer=dict(
            num_layers=2, mlp_dim=24, num_heads=3, dropout_rate=0.0, attention_dropout_rate=0.5
        )
    )
    twins = np.repeat(x[:1], 2, axis=0)  # two identical images
    train_apply = jax.jit(functools.partial(attention_dropout_only.apply, train=True))
    out = np.asarray(train_apply({"params": params}, twins, rngs={"dropout": rng_key(0)}))
    assert np.abs(out[0] - out[1]).max() > 1e-3
    np.testing.assert_allclose(  # and without training the twins agree
        *logits(attention_dropout_only, params, twins), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("attention_impl", ["auto", "xla"])
def test_fused_attention_refuses_attention_dropout(vit_setup, attention_impl):
    model, params, x, want = vit_setup
    fused = model.clone(
        attention_impl=attention_impl,
        transformer=dict(
            num_layers=2, mlp_dim=24, num_heads=3, dropout_rate=0.0, attention_dropout_rate=0.1
        ),
    )
    with pytest.raises(ValueError, match="attention_dropout_rate"):
        fused.apply({"params": params}, x, train=True, rngs={"dropout": rng_key(0)})
    # Evaluation (no dropout applied) is fine and matches 'flax'.
    np.testing.assert_allclose(logits(fused, params, x), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 8. Bad configuration.


@pytest.mark.parametrize(
    "option, valid",
    [
        ("classifier", models_vit.CLASSIFIERS),
        ("attention_impl", models_vit.ATTENTION_IMPLS),
        ("remat_policy", models_vit.REMAT_POLICIES),
    ],
)
def test_unknown_string_option_lists_valid_values(option, valid):
    model = models.get_model("testing", num_classes=3, **{option: "bogus"})
    with pytest.raises(ValueError, match="bogus") as info:
        abstract_init(model, (1, 32, 32, 3))
    message = str(info.value)
    assert option in message
    for value in valid:
        assert repr(value) in message


@pytest.mark.parametrize(
    "name, size, total",
    [
        ("testing", (40, 32), 16),  # plain ViT, patch 16
        ("ViT-B_16", (225, 224), 16),
        ("R50+ViT-B_16", (232, 232), 16),  # patch 1 after a /16 stem; 232 = 8 * 29
        ("R+ViT-Ti_16", (240, 240), 32),  # patch 8 after a /4 stem; 240 = 16 * 15
        ("Mixer-B_16", (200, 200), 16),
    ],
)
def test_image_size_not_divisible(name, size, total):
    model = models.get_model(name, num_classes=10)
    with pytest.raises(ValueError, match="not divisible") as info:
        abstract_init(model, (1, *size, 3))
    message = str(info.value)
    assert str(tuple(size)) in message
    assert str((total, total)) in message
    assert name in message


def test_hybrid_image_size_counts_the_stem_stride():
    model = tiny_hybrid(patches={"size": (2, 2)})  # stem /8, patch 2 → 16 px
    with pytest.raises(ValueError, match="stride 8") as info:
        abstract_init(model, (1, 24, 24, 3))  # divisible by 8 and by 2, not by 16
    assert "(16, 16)" in str(info.value) and "(24, 24)" in str(info.value)
    _, out = abstract_init(model, (1, 32, 48, 3))
    assert out.shape == (1, 5)


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match="ViT-B_16") as info:
        models.get_model("ViT-B16", num_classes=10)
    assert "'ViT-B16'" in str(info.value)
    with pytest.raises(ValueError, match="Mixer-B_16"):
        models.get_config("mixer-B_16")


def test_unknown_override_key():
    with pytest.raises(ValueError, match="num_clases"):
        models.get_model("testing", num_classes=10, num_clases=10)
    with pytest.raises(ValueError, match="hidden_size"):  # Mixer has no hidden_size
        models.get_model("Mixer-B_16", num_classes=10, hidden_size=8)
    # A misspelt key inside a nested override is refused too, not silently stored.
    with pytest.raises(ValueError, match="dropuot_rate") as info:
        models.get_model("testing", num_classes=10, transformer=dict(dropuot_rate=0.5))
    assert "dropout_rate" in str(info.value)


def test_get_model_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        models.get_model("testing")


def test_get_model_nested_override_keeps_other_keys():
    model = models.get_model("ViT-B_16", num_classes=10, transformer=dict(dropout_rate=0.3))
    assert model.transformer.dropout_rate == 0.3
    assert model.transformer.num_layers == 12
    assert models.MODEL_CONFIGS["ViT-B_16"].transformer.dropout_rate == 0.0


def test_get_config_returns_a_copy():
    config = models.get_config("ViT-B_16")
    config.hidden_size = 1
    config.transformer.num_layers = 1
    config.patches.size = (2, 2)
    assert models.MODEL_CONFIGS["ViT-B_16"].hidden_size == 768
    assert models.MODEL_CONFIGS["ViT-B_16"].transformer.num_layers == 12
    assert tuple(models.MODEL_CONFIGS["ViT-B_16"].patches.size) == (16, 16)
    assert models.get_config("ViT-B_16").hidden_size == 768


def test_original_configs_import_path():
    from vit_jax.configs import models as models_config

    config = models_config.MODEL_CONFIGS["ViT-B_16"]
    model = VisionTransformer(num_classes=10, **config)
    params, out = abstract_init(model, (1, 224, 224, 3))
    assert out.shape == (1, 10)
    assert param_count(params) == EXPECTED_PARAM_COUNTS["ViT-B_16"] - 1000 * 769 + 10 * 769
    mixer = MlpMixer(num_classes=10, **models_config.MODEL_CONFIGS["Mixer-B_16"])
    _, out = abstract_init(mixer, (1, 224, 224, 3))
    assert out.shape == (1, 10)


# ----------------------------------------------------------------------------------------------
# 9. Recipe options: stochastic depth, the MLP head, extra per-example features.


def test_recipe_options_off_keep_the_tree_and_the_numbers(vit_setup):
    """drop_path_rate=0, head_hidden_size 0/None, features=None: today's model, bit for bit."""
    model, params, x, want = vit_setup
    dropout = dict(
        num_layers=2, mlp_dim=24, num_heads=3, dropout_rate=0.2, attention_dropout_rate=0.2
    )
    base = model.clone(transformer=dropout)
    off = base.clone(drop_path_rate=0.0, head_hidden_size=0)
    tree, _ = abstract_init(off, VIT_IMAGE)
    assert flat_shapes(tree) == flat_shapes(params)
    np.testing.assert_array_equal(jitted_apply(off)({"params": params}, x, features=None), want)
    train = [
        jax.jit(functools.partial(m.apply, train=True))(
            {"params": params}, x, rngs={"dropout": rng_key(3)}
        )
        for m in (base, off)
    ]
    np.testing.assert_array_equal(*train)  # the dropout masks are today's too
    mixer, mixer_off = tiny_mixer(), tiny_mixer(head_hidden_size=None)
    mixer_params = random_params(mixer, MIXER_IMAGE, seed=4)
    assert flat_shapes(abstract_init(mixer_off, MIXER_IMAGE)[0]) == flat_shapes(mixer_params)
    np.testing.assert_array_equal(
        logits(mixer_off, mixer_params, images(MIXER_IMAGE)),
        logits(mixer, mixer_params, images(MIXER_IMAGE)),
    )


def test_drop_path_rates_grow_linearly_over_depth():
    # DeiT / timm: torch.linspace(0, rate, depth).
    np.testing.assert_allclose(stochastic_depth.drop_path_rates(0.3, 4), [0, 0.1, 0.2, 0.3])
    np.testing.assert_array_equal(stochastic_depth.drop_path_rates(0.3, 1), [0.0])
    rates = stochastic_depth.drop_path_rates(0.1, 12)
    assert rates.dtype == np.float32 and rates[0] == 0.0
    np.testing.assert_allclose(rates[1], 0.1 / 11, rtol=1e-6)


def test_drop_path_zeroes_or_scales_whole_samples():
    x = jnp.ones((20_000, 3, 2), jnp.float32)
    out, keep = stochastic_depth.drop_path(x, jnp.float32(0.25), jax.random.key(0))
    out, keep = np.asarray(out), np.asarray(keep)
    assert out.dtype == np.float32 and keep.shape == (20_000,)
    # A sample is dropped or kept whole: all zeros, or all 1 / (1 - 0.25).
    want = np.where(keep, np.float32(1 / 0.75), 0.0)[:, None, None]
    np.testing.assert_array_equal(out, np.broadcast_to(want, out.shape))
    assert abs((1 - np.asarray(keep).mean()) - 0.25) < 0.01  # std of the fraction: 0.003
    assert abs(out.mean() - 1.0) < 0.015  # the expected value is the input's
    same, keep_all = stochastic_depth.drop_path(x.astype(jnp.bfloat16), 0.0, jax.random.key(0))
    assert np.asarray(keep_all).all() and same.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(same, np.float32), 1.0)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 2, float("nan"), True, "0.1", None])
def test_drop_path_rate_is_validated(rate):
    with pytest.raises(ValueError, match=r"drop_path_rate must be a float in \[0, 1\)") as info:
        abstract_init(tiny_vit(drop_path_rate=rate), VIT_IMAGE)
    assert repr(rate) in str(info.value)


def test_drop_path_is_off_in_evaluation(vit_setup):
    model, params, x, want = vit_setup
    dropping = model.clone(drop_path_rate=0.5)
    assert flat_shapes(abstract_init(dropping, VIT_IMAGE)[0]) == flat_shapes(params)
    np.testing.assert_array_equal(logits(dropping, params, x), want)  # and needs no rng


# Four blocks, rates 0, 0.2, 0.4, 0.6; no dropout, so the drop-path masks are the only noise.
DROP_PATH_TRANSFORMER = dict(
    num_layers=4, mlp_dim=24, num_heads=3, dropout_rate=0.0, attention_dropout_rate=0.0
)
DROP_PATH_RATES = (0.0, 0.2, 0.4, 0.6)


def _drop_path_model(**overrides) -> VisionTransformer:
    return tiny_vit(transformer=DROP_PATH_TRANSFORMER, drop_path_rate=0.6, **overrides)


def _train_with_masks(model, params, x, seed=0):
    """Training-mode logits and the keep masks, (layers, 2 branches, batch), of every block."""
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["intermediates"]))
    out, state = apply({"params": params}, x, rngs={"dropout": rng_key(seed)})
    blocks = state["intermediates"]["Transformer"]
    if model.scan:
        (keep,) = blocks["encoderblock"]["drop_path_keep"]
    else:
        keep = np.stack([blocks[f"encoderblock_{i}"]["drop_path_keep"][0] for i in range(4)])
    return np.asarray(out), np.asarray(keep)


def test_drop_path_drops_each_branch_at_its_blocks_rate():
    model = _drop_path_model()
    x = images((1024, 8, 8, 3))
    _, keep = _train_with_masks(model, random_params(model, x.shape, seed=7), x)
    assert keep.shape == (4, 2, 1024) and keep.dtype == bool
    dropped = 1.0 - keep.mean(axis=-1)  # (layer, branch)
    # Binomial std of a fraction of 1024 draws is <= 0.016; 0.05 is over 3 of them.
    np.testing.assert_allclose(dropped, np.repeat([DROP_PATH_RATES], 2, 0).T, atol=0.05)
    assert keep[0].all()  # block 0's rate is exactly 0
    # The two branches of a block draw independent masks (agreement ~ 0.6² + 0.4² = 0.52).
    assert 0.45 < (keep[3, 0] == keep[3, 1]).mean() < 0.6


def np_vit_dropped(p, x, keep, rates):
    """`np_vit` (token, representation 8) with each block's branches masked and rescaled."""
    h = np_patch_embed(np.asarray(x, np.float64), p["embedding"])
    h = np.concatenate([np.broadcast_to(p["cls"], (h.shape[0], 1, h.shape[2])), h], axis=1)
    h = h + p["Transformer"]["posembed_input"]["pos_embedding"]
    for i, rate in enumerate(rates):
        b = p["Transformer"][f"encoderblock_{i}"]
        scale = keep[i][:, :, None, None] / (1.0 - rate)  # (2, batch, 1, 1)
        attention = np_attention(
            np_layernorm(h, b["LayerNorm_0"]), b["MultiHeadDotProductAttention_0"], 3
        )
        h = h + scale[0] * attention
        y = np_layernorm(h, b["LayerNorm_1"])
        y = np_dense(
            np_gelu_tanh(np_dense(y, b["MlpBlock_0"]["Dense_0"])), b["MlpBlock_0"]["Dense_1"]
        )
        h = h + scale[1] * y
    h = np_layernorm(h, p["Transformer"]["encoder_norm"])[:, 0]
    return np_dense(np.tanh(np_dense(h, p["pre_logits"])), p["head"])


@pytest.fixture(scope="module")
def drop_path_setup():
    """The unrolled drop-path model in training: params, images, logits and masks."""
    model = _drop_path_model(representation_size=8)
    x = images((16, 16, 24, 3))
    params = random_params(model, x.shape, seed=8)
    return model, params, x, *_train_with_masks(model, params, x)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(scan=True), dict(scan=True, remat_policy="nothing_saveable")],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "unrolled",
)
def test_drop_path_matches_reference_with_the_drawn_masks(drop_path_setup, options):
    """The logits are the reference forward pass with those masks, and the scanned encoder
    (each layer's key a scanned input) draws the unrolled encoder's masks for the same rng."""
    model, params, x, want_out, want_keep = drop_path_setup
    variant = model.clone(**options)
    variant_params = checkpoint.scan_params(params) if options.get("scan") else params
    out, keep = _train_with_masks(variant, variant_params, x)
    np.testing.assert_array_equal(keep, want_keep)
    assert 0.1 < 1 - keep[1:].mean() < 0.7  # something was dropped, not everything
    want = np_vit_dropped(to_numpy64(params), x, keep, DROP_PATH_RATES)
    assert (
        np.abs(want - np_vit_dropped(to_numpy64(params), x, np.ones_like(keep), [0] * 4)).max()
        > 0.1
    )
    np.testing.assert_allclose(out, want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)


def test_drop_path_gradients_agree_scanned_and_rematerialised(drop_path_setup):
    """Recomputation under remat replays the masks, so gradients match the unrolled model's."""
    model, params, x, _, _ = drop_path_setup
    variant = model.clone(scan=True, remat_policy="nothing_saveable")

    def grads(m, p):
        def loss(q):
            out = m.apply({"params": q}, x, train=True, rngs={"dropout": rng_key(0)})
            return jnp.sum(out**2)

        return jax.jit(jax.grad(loss))(p)

    want = flax.traverse_util.flatten_dict(grads(model, params), sep="/")
    got = _unscanned(
        flax.traverse_util.flatten_dict(grads(variant, checkpoint.scan_params(params)), sep="/")
    )
    assert np.abs(want["Transformer/encoderblock_3/LayerNorm_0/scale"]).max() > 1e-2
    assert _relative_error(got, want) < 1e-5


def test_drop_path_with_batch_chunks_draws_each_chunk_anew():
    model = _drop_path_model(batch_chunks=2)
    x = np.repeat(images((1, 8, 8, 3)), 32, axis=0)  # one image, 32 times
    params = random_params(model, x.shape, seed=9)
    train = jax.jit(functools.partial(model.apply, train=True))
    out = np.asarray(train({"params": params}, x, rngs={"dropout": rng_key(0)}))
    # A key shared by the chunks would give both halves the same masks, row for row.
    assert np.abs(out[:16] - out[16:]).max() > 1e-3
    assert len(np.unique(out.round(5), axis=0)) > 4
    evaluated = logits(model, params, x)  # evaluation: every copy the same
    np.testing.assert_allclose(evaluated, np.broadcast_to(evaluated[:1], out.shape), atol=1e-6)


def test_head_hidden_and_features_param_trees():
    base = {k: v for k, v in TESTING_TREE_32PX.items() if not k.startswith("head/")}
    model = models.get_model("testing", num_classes=7, head_hidden_size=6)
    params, out = abstract_init(model, (2, 32, 32, 3))
    assert out.shape == (2, 7)
    assert flat_shapes(params) == {
        **base,
        "head_hidden/kernel": (10, 6),
        "head_hidden/bias": (6,),
        "head/kernel": (6, 7),
        "head/bias": (7,),
    }
    # Features widen the first head layer's input: pre_logits (4) + 3 features.
    model = models.get_model("testing", num_classes=7, head_hidden_size=6, representation_size=4)
    params, _ = abstract_init(model, (2, 32, 32, 3), features=jnp.zeros((2, 3)))
    shapes = flat_shapes(params)
    assert (shapes["pre_logits/kernel"], shapes["head_hidden/kernel"]) == ((10, 4), (7, 6))
    params, _ = abstract_init(
        models.get_model("testing", num_classes=7), (2, 32, 32, 3), features=jnp.zeros((2, 3))
    )
    assert flat_shapes(params) == {**base, "head/kernel": (13, 7), "head/bias": (7,)}
    mixer_params, _ = abstract_init(
        tiny_mixer(head_hidden_size=6), MIXER_IMAGE, features=jnp.zeros((2, 3))
    )
    mixer_shapes = flat_shapes(mixer_params)
    assert {k: v for k, v in mixer_shapes.items() if k.startswith("head")} == {
        "head_hidden/kernel": (16 + 3, 6),
        "head_hidden/bias": (6,),
        "head/kernel": (6, 5),
        "head/bias": (5,),
    }


def np_gelu_erf(x):
    return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def np_mlp_head(pooled, features, p, gelu=np_gelu_erf):
    """[pooled ⊕ features] → head_hidden → GELU → head."""
    x = np.concatenate([pooled, np.asarray(features, np.float64)], axis=1)
    return np_dense(gelu(np_dense(x, p["head_hidden"])), p["head"])


@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_head_hidden_with_features_golden(family):
    if family == "vit":
        model, shape = tiny_vit(representation_size=8, head_hidden_size=6), VIT_IMAGE
        features_of = functools.partial(
            np_vit,
            heads=3,
            num_layers=2,
            classifier="token",
            representation_size=8,
            num_classes=0,
        )
    else:
        model, shape = tiny_mixer(head_hidden_size=6), MIXER_IMAGE
        features_of = functools.partial(np_mixer, num_blocks=2, num_classes=0)
    x = images(shape)
    extra = 2.0 * np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    params = randomize(abstract_init(model, shape, features=extra)[0], seed=10)
    # Pre-activations of a few units, where the two GELUs differ most, and a head that shows it.
    params["head_hidden"]["kernel"] *= 3.0
    params["head"]["kernel"] *= 10.0
    got = np.asarray(jitted_apply(model)({"params": params}, x, features=extra))
    p64 = to_numpy64(params)
    pooled = features_of(p64, x)
    want = np_mlp_head(pooled, extra, p64)
    assert got.shape == (2, 5) and np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)
    # The GELU is the exact (erf) one: the tanh approximation is measurably off here.
    assert np.abs(np_mlp_head(pooled, extra, p64, np_gelu_tanh) - want).max() > 100 * GOLDEN_ATOL
    # Without a head the model returns the pooled features with the extra ones after them.
    no_head = {k: v for k, v in params.items() if not k.startswith("head")}
    out = jitted_apply(model.clone(num_classes=0))({"params": no_head}, x, features=extra)
    np.testing.assert_allclose(out, np.concatenate([pooled, extra], 1), rtol=1e-5, atol=1e-5)


def test_head_hidden_initial_values():
    model = models.get_model("testing", num_classes=3, head_hidden_size=256, head_bias_init=-2.0)
    params = init_params(model, (1, 32, 32, 3))
    kernel = np.asarray(params["head_hidden"]["kernel"])  # lecun normal, fan_in 10
    assert kernel.shape == (10, 256)
    assert 0.93 < kernel.std() * math.sqrt(10) < 1.07  # 2560 draws (truncated normal)
    np.testing.assert_array_equal(params["head_hidden"]["bias"], 0.0)
    np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["head"]["bias"], -2.0)
    # The zero head kernel makes every initial prediction the bias.
    np.testing.assert_array_equal(logits(model, params, images((2, 32, 32, 3))), -2.0)


@pytest.mark.parametrize("size", [-1, 2.5, True, "128"])
@pytest.mark.parametrize("make_model", [tiny_vit, tiny_mixer])
def test_head_hidden_size_is_validated(make_model, size):
    shape = VIT_IMAGE if make_model is tiny_vit else MIXER_IMAGE
    with pytest.raises(ValueError, match="head_hidden_size must be a positive integer") as info:
        abstract_init(make_model(head_hidden_size=size), shape)
    assert repr(size) in str(info.value)


@pytest.mark.parametrize("make_model", [tiny_vit, tiny_mixer])
def test_features_must_match_the_images(make_model):
    shape = VIT_IMAGE if make_model is tiny_vit else MIXER_IMAGE
    with pytest.raises(ValueError, match="batch sizes") as info:
        abstract_init(make_model(), shape, features=jnp.zeros((3, 4)))
    assert "(3, 4)" in str(info.value) and str(shape) in str(info.value)
    with pytest.raises(ValueError, match=r"\[batch, F\].*\(2,\)"):
        abstract_init(make_model(), shape, features=jnp.zeros((2,)))


def test_features_need_a_pooled_classifier():
    with pytest.raises(ValueError, match="classifier='unpooled'"):
        abstract_init(tiny_vit(classifier="unpooled"), VIT_IMAGE, features=jnp.zeros((2, 3)))


def test_zoo_takes_the_recipe_options_as_options():
    model = models.get_model("ViT-B_16", num_classes=1, drop_path_rate=0.1, head_hidden_size=128)
    assert (model.drop_path_rate, model.head_hidden_size) == (0.1, 128)
    params, out = abstract_init(model, (1, 224, 224, 3))
    base = EXPECTED_PARAM_COUNTS["ViT-B_16"] - 769 * 1000
    assert param_count(params) == base + 769 * 128 + 129 * 1 and out.shape == (1, 1)
    # Options, not architecture: a config named after the zoo model may set them.
    config = models.get_config("ViT-B_16")
    config.drop_path_rate, config.head_hidden_size = 0.1, 128
    models.check_model_config(config)
    mixer = models.get_model("Mixer-B_16", num_classes=1, head_hidden_size=128)
    assert mixer.head_hidden_size == 128
    with pytest.raises(ValueError, match="drop_path_rate") as info:  # a ViT-only option
        models.get_model("Mixer-B_16", num_classes=1, drop_path_rate=0.1)
    assert "head_hidden_size" in str(info.value)  # listed among the valid ones


# ----------------------------------------------------------------------------------------------
# 10. DeiT: the exact GELU and the distillation token.


def _mlp_block_output(activation, x, seed=0):
    block = models_vit.MlpBlock(mlp_dim=16, dropout_rate=0.0, **activation)
    params = block.init(jax.random.key(seed), x, deterministic=True)["params"]
    params = randomize(params, seed)
    out = block.apply({"params": params}, x, deterministic=True)
    return np.asarray(out), params


def test_activation_default_is_the_tanh_gelu_and_gelu_is_exact_erf():
    x = jnp.asarray(3 * np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
    default, params = _mlp_block_output({}, x)
    tanh, _ = _mlp_block_output({"activation": "gelu_tanh"}, x)
    erf, _ = _mlp_block_output({"activation": "gelu"}, x)
    np.testing.assert_array_equal(default, tanh)  # the default is the original's, bit for bit
    h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    for got, gelu in ((tanh, jax.nn.gelu(h, approximate=True)), (erf, jax.nn.gelu(h, False))):
        want = gelu @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.abs(erf - tanh).max() > 1e-4  # the two forms really differ here


def test_activation_on_the_whole_model(vit_setup):
    model, params, x, want = vit_setup
    explicit = model.clone(activation="gelu_tanh")
    assert flat_shapes(abstract_init(explicit, VIT_IMAGE)[0]) == flat_shapes(params)
    np.testing.assert_array_equal(logits(explicit, params, x), want)
    exact = model.clone(activation="gelu")
    got = logits(exact, params, x)
    reference = dict(heads=3, num_layers=2, classifier="token", representation_size=8)
    golden = np_vit(to_numpy64(params), x, num_classes=5, gelu=np_gelu_erf, **reference)
    np.testing.assert_allclose(got, golden, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)
    # The two GELUs differ by < 2e-4 anywhere, so the logits move little but well above fp32
    # noise: the exact model is far closer to the erf reference than to the tanh one.
    tanh_golden = np_vit(to_numpy64(params), x, num_classes=5, **reference)
    assert np.abs(got - tanh_golden).max() > 10 * np.abs(got - golden).max()
    assert np.abs(got - want).max() > 5e-6


def test_activation_is_validated():
    model = tiny_vit(activation="relu")
    with pytest.raises(ValueError, match="activation='relu'") as info:
        abstract_init(model, VIT_IMAGE)
    assert "'gelu_tanh'" in str(info.value) and "'gelu'" in str(info.value)


def test_distilled_param_tree_and_initial_values():
    plain, distilled = tiny_vit(), tiny_vit(distilled=True)
    base = flat_shapes(abstract_init(plain, VIT_IMAGE)[0])
    tree = flat_shapes(abstract_init(distilled, VIT_IMAGE)[0])
    grid = 4 * 6
    assert base["Transformer/posembed_input/pos_embedding"] == (1, 1 + grid, 12)
    expected = {
        **base,
        "Transformer/posembed_input/pos_embedding": (1, 2 + grid, 12),
        "dist_token": (1, 1, 12),
        "head_dist/kernel": (12, 5),
        "head_dist/bias": (5,),
    }
    assert tree == expected
    assert flat_shapes(abstract_init(tiny_vit(distilled=False), VIT_IMAGE)[0]) == base
    params = init_params(tiny_vit(distilled=True, head_bias_init=-2.0), VIT_IMAGE)
    np.testing.assert_array_equal(params["dist_token"], 0.0)
    np.testing.assert_array_equal(params["head_dist"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["head_dist"]["bias"], -2.0)  # the head's init


@pytest.mark.parametrize("representation_size", [None, 8])
def test_distilled_golden_train_pair_and_eval_mean(representation_size):
    model = tiny_vit(distilled=True, activation="gelu", representation_size=representation_size)
    params = random_params(model, VIT_IMAGE, seed=7)
    x = images(VIT_IMAGE)
    want_cls, want_dist = np_vit(
        to_numpy64(params),
        x,
        heads=3,
        num_layers=2,
        classifier="token",
        representation_size=representation_size,
        num_classes=5,
        gelu=np_gelu_erf,
        distilled=True,
    )
    assert np.abs(want_cls - want_dist).max() > 0.1  # two different heads on two tokens
    train = jax.jit(functools.partial(model.apply, train=True))
    got_cls, got_dist = train({"params": params}, x, rngs={"dropout": rng_key(0)})
    assert got_cls.dtype == got_dist.dtype == jnp.float32
    np.testing.assert_allclose(got_cls, want_cls, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)
    np.testing.assert_allclose(got_dist, want_dist, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL)
    got = logits(model, params, x)  # train=False: one array, the mean of the two heads
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, (want_cls + want_dist) / 2, rtol=1e-5, atol=1e-5)


def test_distilled_without_a_head_returns_the_mean_token():
    model = tiny_vit(distilled=True, num_classes=0)
    params = random_params(model, VIT_IMAGE, seed=2)
    x = images(VIT_IMAGE)
    _, state = jitted_apply(model, mutable=True)({"params": params}, x)
    encoded = np.asarray(state["intermediates"]["encoded"][0])
    for train in (False, True):
        out = model.apply({"params": params}, x, train=train, rngs={"dropout": rng_key(0)})
        np.testing.assert_allclose(out, (encoded[:, 0] + encoded[:, 1]) / 2, atol=1e-6)


@pytest.mark.parametrize("classifier", ["gap", "unpooled", "token_unpooled"])
def test_distilled_needs_the_token_classifier(classifier):
    with pytest.raises(ValueError, match=f"distilled=True needs classifier='token'.*{classifier}"):
        abstract_init(tiny_vit(distilled=True, classifier=classifier), VIT_IMAGE)
    with pytest.raises(ValueError, match="distilled must be True or False"):
        abstract_init(tiny_vit(distilled=1), VIT_IMAGE)


# name: (timm 1.0.31 name, hidden, distilled). The counts in EXPECTED_PARAM_COUNTS were measured
# on timm's models at 1000 classes (sum of p.numel()); tests/test_interop_timm_deit.py compares
# them with timm live where timm imports.
DEIT_ZOO = {
    "DeiT-Ti_16": ("deit_tiny_patch16_224", 192, False),
    "DeiT-S_16": ("deit_small_patch16_224", 384, False),
    "DeiT-B_16": ("deit_base_patch16_224", 768, False),
    "DeiT-Ti_16-dist": ("deit_tiny_distilled_patch16_224", 192, True),
    "DeiT-S_16-dist": ("deit_small_distilled_patch16_224", 384, True),
    "DeiT-B_16-dist": ("deit_base_distilled_patch16_224", 768, True),
}


@pytest.mark.parametrize("name", sorted(DEIT_ZOO))
def test_deit_zoo_entries(name):
    _, hidden, distilled = DEIT_ZOO[name]
    config = models.MODEL_CONFIGS[name]
    assert (config.activation, config.distilled, config.classifier) == ("gelu", distilled, "token")
    assert config.hidden_size == hidden and tuple(config.patches.size) == (16, 16)
    assert models_vit.LAYERNORM_EPSILON == 1e-6  # as the original (and timm's DeiT)
    plain = models.MODEL_CONFIGS[name.replace("DeiT", "ViT").removesuffix("-dist")]
    extra = 2 * hidden + (hidden + 1) * 1000 if distilled else 0
    assert EXPECTED_PARAM_COUNTS[name] == EXPECTED_PARAM_COUNTS[plain.model_name] + extra
    model = models.get_model(name, num_classes=1000)
    assert (model.activation, model.distilled) == ("gelu", distilled)


def test_deit_activation_and_distilled_are_architecture_fields():
    models.check_model_config(models.get_config("DeiT-S_16-dist"))
    config = models.get_config("ViT-S_16")
    config.activation, config.distilled = "gelu_tanh", False  # the defaults, spelled out
    models.check_model_config(config)
    config = models.get_config("DeiT-S_16")
    config.distilled = True
    with pytest.raises(ValueError, match=r"distilled True \(DeiT-S_16: False\)"):
        models.check_model_config(config)
    config = models.get_config("ViT-S_16")
    config.activation = "gelu"
    with pytest.raises(ValueError, match=r"activation gelu \(ViT-S_16: gelu_tanh\)"):
        models.check_model_config(config)
