"""Interop with timm: our released-format `.npz` files against another reader of the format.

timm's `timm.models.vision_transformer._load_weights` reads the original ViT `.npz` files (older
block numbering `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`). These tests check,
in fp32 on random weights (every leaf re-drawn, so the zero-initialised head cannot hide anything):

- a file written by `vit_jax.checkpoint.save` loads into timm, every timm tensor equals the
  matching one of our params (so nothing was silently skipped: timm ignores unknown keys and a
  head of the wrong size), `checkpoint.load` reads back the very same arrays, and timm computes
  the same logits as our Flax model (token and GAP classifiers, unrolled and `scan=True`);
- the other way round, a timm model's weights exported as a released-format file by this module
  (key mapping written here from the released files' names and checked against timm's own
  reader) load with `checkpoint.load` into our model, which then computes timm's logits.

timm uses exact GELU by default; the released models use the tanh approximation, hence
`act_layer='gelu_tanh'` (a test below shows the comparison is sharp enough to tell the two apart).

Needs torch, torchvision and timm: `pip install -e '.[interop]'` (CI installs them). With a
CPU-only torch, torchvision's import needs `tests/_torchvision_shim.py`.
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._torchvision_shim import require_timm
from vit_jax import checkpoint
from vit_jax.models_vit import VisionTransformer

torch, timm = require_timm()
from timm.models import vision_transformer as timm_vit  # noqa: E402

# A small ViT: 32 px images, 8 px patches (4x4 grid), 2 blocks.
IMAGE = 32
PATCH = 8
HIDDEN = 32
MLP = 64
HEADS = 4
LAYERS = 2
CLASSES = 7
# Measured max |Δlogit| <= 1.1e-6 in fp32 for logits of magnitude 1-2 (timm 1.0.31, torch 2.13 CPU,
# jax 0.10.2); exact-instead-of-tanh GELU moves them by >= 1.6e-4.
ATOL = 1e-5

# (classifier, scan) variants of our model.
VARIANTS = [("token", False), ("gap", False), ("token", True)]
VARIANT_IDS = ["token", "gap", "token-scan"]


# ----------------------------------------------------------------------------------------------
# Our side.


def _our_model(classifier: str, scan: bool = False) -> VisionTransformer:
    return VisionTransformer(
        num_classes=CLASSES,
        patches={"size": (PATCH, PATCH)},
        transformer={
            "num_layers": LAYERS,
            "mlp_dim": MLP,
            "num_heads": HEADS,
            "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
        },
        hidden_size=HIDDEN,
        classifier=classifier,
        scan=scan,
    )


def _draw(rng: np.random.Generator, kind: str, shape: tuple[int, ...], fan_in: int = 1):
    """A float32 array of `shape`, scaled by `kind` so that activations and logits stay O(1)."""
    x = rng.standard_normal(shape)
    if kind == "scale":  # LayerNorm gains: around 1.
        x = 1.0 + 0.1 * x
    elif kind == "bias":
        x = 0.1 * x
    elif kind == "kernel":
        x = x / math.sqrt(fan_in)
    else:  # class token, position table.
        x = 0.5 * x
    return x.astype(np.float32)


def _param_shapes(model: VisionTransformer) -> dict:
    """The parameter tree `model.init` would give, as ShapeDtypeStructs (nothing is computed)."""
    variables = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.PRNGKey(0),
        jnp.zeros((1, IMAGE, IMAGE, 3)),
    )
    return flax.core.unfreeze(variables["params"])


def _random_params(model: VisionTransformer, seed: int) -> dict:
    """Every leaf of `model`'s parameter tree drawn with a seeded NumPy RNG (the zero head too)."""
    flat = flax.traverse_util.flatten_dict(_param_shapes(model))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in sorted(flat.items()):
        shape = tuple(leaf.shape)
        core = shape[1:] if checkpoint.SCANNED_BLOCK in path else shape  # drop the layer axis
        kind = path[-1] if path[-1] in ("scale", "bias", "kernel") else "other"
        if path[-2:-1] in (("query",), ("key",), ("value",)) and kind == "kernel":
            fan_in = core[0]  # (D, heads, D/heads)
        else:
            fan_in = math.prod(core[:-1])
        out[path] = _draw(rng, kind, shape, fan_in)
    return flax.traverse_util.unflatten_dict(out)


def _unrolled(params: dict) -> dict:
    return checkpoint.unscan_params(params) if checkpoint.is_scanned(params) else params


def _our_logits(model: VisionTransformer, params: dict, images: np.ndarray) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, jnp.asarray(images), train=False))


def _images(seed: int, n: int = 4) -> np.ndarray:
    """Random NHWC images in [-1, 1], the range the released models expect."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# timm's side and the key mappings (independent of vit_jax.checkpoint's renaming).


def _timm_model(classifier: str, act_layer: str = "gelu_tanh"):
    pooling = {}
    if classifier == "gap":
        pooling = dict(class_token=False, global_pool="avg", fc_norm=False)
    model = timm_vit.VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=HIDDEN,
        depth=LAYERS,
        num_heads=HEADS,
        mlp_ratio=MLP / HIDDEN,
        num_classes=CLASSES,
        act_layer=act_layer,
        **pooling,
    ).eval()
    # The released models' LayerNorm epsilon (1e-6, the original's); timm's ViT default.
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    return model


def _timm_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _timm_logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _timm_state_from_ours(params: dict) -> dict[str, np.ndarray]:
    """Our (unrolled, current Linen numbering) params as the timm state dict they should give."""
    p = params
    t = p["Transformer"]
    state = {
        "patch_embed.proj.weight": p["embedding"]["kernel"].transpose(3, 2, 0, 1),  # HWIO → OIHW
        "patch_embed.proj.bias": p["embedding"]["bias"],
        "pos_embed": t["posembed_input"]["pos_embedding"],
        "norm.weight": t["encoder_norm"]["scale"],
        "norm.bias": t["encoder_norm"]["bias"],
    }
    if "head" in p:  # a headless encoder has none (timm's head is then an Identity)
        state |= {"head.weight": p["head"]["kernel"].T, "head.bias": p["head"]["bias"]}
    if "cls" in p:
        state["cls_token"] = p["cls"]
    for i in range(LAYERS):
        b = t[f"encoderblock_{i}"]
        attn, mlp = b["MultiHeadDotProductAttention_0"], b["MlpBlock_0"]
        names = ("query", "key", "value")
        state |= {
            f"blocks.{i}.norm1.weight": b["LayerNorm_0"]["scale"],
            f"blocks.{i}.norm1.bias": b["LayerNorm_0"]["bias"],
            f"blocks.{i}.attn.qkv.weight": np.concatenate(
                [attn[n]["kernel"].reshape(HIDDEN, HIDDEN).T for n in names]
            ),
            f"blocks.{i}.attn.qkv.bias": np.concatenate(
                [attn[n]["bias"].reshape(-1) for n in names]
            ),
            f"blocks.{i}.attn.proj.weight": attn["out"]["kernel"].reshape(HIDDEN, HIDDEN).T,
            f"blocks.{i}.attn.proj.bias": attn["out"]["bias"],
            f"blocks.{i}.norm2.weight": b["LayerNorm_1"]["scale"],
            f"blocks.{i}.norm2.bias": b["LayerNorm_1"]["bias"],
            f"blocks.{i}.mlp.fc1.weight": mlp["Dense_0"]["kernel"].T,
            f"blocks.{i}.mlp.fc1.bias": mlp["Dense_0"]["bias"],
            f"blocks.{i}.mlp.fc2.weight": mlp["Dense_1"]["kernel"].T,
            f"blocks.{i}.mlp.fc2.bias": mlp["Dense_1"]["bias"],
        }
    return {k: np.asarray(v) for k, v in state.items()}


def _released_from_timm(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A timm ViT state dict as the flat arrays of a released `.npz` (released names)."""
    head_dim = HIDDEN // HEADS
    flat = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # → HWIO
        "embedding/bias": state["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": state["head.weight"].T,
        "head/bias": state["head.bias"],
    }
    if "cls_token" in state:
        flat["cls"] = state["cls_token"]
    for i in range(LAYERS):
        s, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn, mlp = b + "MultiHeadDotProductAttention_1/", b + "MlpBlock_3/"
        qkv_w = np.split(state[s + "attn.qkv.weight"], 3)
        qkv_b = np.split(state[s + "attn.qkv.bias"], 3)
        for n, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            flat[attn + n + "/kernel"] = w.T.reshape(HIDDEN, HEADS, head_dim)
            flat[attn + n + "/bias"] = bias.reshape(HEADS, head_dim)
        flat |= {
            b + "LayerNorm_0/scale": state[s + "norm1.weight"],
            b + "LayerNorm_0/bias": state[s + "norm1.bias"],
            attn + "out/kernel": state[s + "attn.proj.weight"].T.reshape(HEADS, head_dim, HIDDEN),
            attn + "out/bias": state[s + "attn.proj.bias"],
            b + "LayerNorm_2/scale": state[s + "norm2.weight"],
            b + "LayerNorm_2/bias": state[s + "norm2.bias"],
            mlp + "Dense_0/kernel": state[s + "mlp.fc1.weight"].T,
            mlp + "Dense_0/bias": state[s + "mlp.fc1.bias"],
            mlp + "Dense_1/kernel": state[s + "mlp.fc2.weight"].T,
            mlp + "Dense_1/bias": state[s + "mlp.fc2.bias"],
        }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}


def _randomize_timm(model, seed: int) -> None:
    """Re-draws every timm parameter (timm inits biases to zero and LayerNorm gains to one)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            shape = tuple(p.shape)
            if ".norm" in name or name.startswith("norm."):
                kind = "scale" if name.endswith("weight") else "bias"
            elif name.endswith("bias"):
                kind = "bias"
            elif name.endswith("weight"):  # Linear (out, in) / Conv (out, in, h, w)
                kind = "kernel"
            else:
                kind = "other"
            p.copy_(torch.from_numpy(_draw(rng, kind, shape, math.prod(shape[1:]))))


def _assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _assert_close_logits(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape == (4, CLASSES)
    assert np.abs(theirs).max() > 0.5  # real weights, not a zero head
    diff = np.abs(ours - theirs).max()
    assert diff <= ATOL, f"max |Δlogit| = {diff:.3g} (logit scale {np.abs(theirs).max():.3g})"


# ----------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize(("classifier", "scan"), VARIANTS, ids=VARIANT_IDS)
def test_saved_npz_loads_into_timm_with_same_logits(tmp_path, classifier, scan):
    model = _our_model(classifier, scan)
    params = _random_params(model, seed=1)
    path = tmp_path / "vit.npz"
    checkpoint.save(params, path)

    # The file is in the released layout: unrolled blocks, older numbering.
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
    block = "Transformer/encoderblock_1/"
    assert {
        block + "MultiHeadDotProductAttention_1/query/kernel",
        block + "LayerNorm_2/scale",
        block + "MlpBlock_3/Dense_1/kernel",
    } <= keys
    assert not any("MultiHeadDotProductAttention_0" in k or "MlpBlock_0" in k for k in keys)

    timm_model = _timm_model(classifier)
    timm_vit._load_weights(timm_model, str(path))

    # Every timm tensor is ours, exactly (nothing left at timm's init, nothing mis-mapped).
    expected = _timm_state_from_ours(_unrolled(params))
    _assert_same_state(_timm_state(timm_model), expected)
    # ...and `checkpoint.load` reads back the very arrays timm got.
    loaded = checkpoint.load(path)
    _assert_same_state(
        flax.traverse_util.flatten_dict(loaded, sep="/"),
        flax.traverse_util.flatten_dict(_unrolled(params), sep="/"),
    )
    _assert_same_state(_timm_state_from_ours(loaded), _timm_state(timm_model))

    images = _images(seed=2)
    _assert_close_logits(_our_logits(model, params, images), _timm_logits(timm_model, images))


@pytest.mark.parametrize(("classifier", "scan"), VARIANTS, ids=VARIANT_IDS)
def test_timm_weights_load_into_our_model_with_same_logits(tmp_path, classifier, scan):
    timm_model = _timm_model(classifier)
    _randomize_timm(timm_model, seed=3)
    state = _timm_state(timm_model)
    path = tmp_path / "from_timm.npz"
    np.savez(path, **_released_from_timm(state))

    # The exported file is what timm's own reader expects: it restores the same model.
    reloaded = _timm_model(classifier)
    timm_vit._load_weights(reloaded, str(path))
    _assert_same_state(_timm_state(reloaded), state)

    model = _our_model(classifier, scan)
    params = checkpoint.load(path)
    if scan:
        params = checkpoint.scan_params(params)
    # Strict: fails on any missing, extra or mis-shaped key.
    checkpoint.inspect_params(params=params, expected=_param_shapes(model))

    images = _images(seed=4)
    _assert_close_logits(_our_logits(model, params, images), _timm_logits(timm_model, images))


def test_comparison_tells_gelu_variants_apart(tmp_path):
    """The logit tolerance is sharp: timm with exact GELU (its default) visibly differs."""
    model = _our_model("token")
    params = _random_params(model, seed=5)
    path = tmp_path / "vit.npz"
    checkpoint.save(params, path)
    exact = _timm_model("token", act_layer="gelu")
    timm_vit._load_weights(exact, str(path))
    images = _images(seed=6)
    diff = np.abs(_our_logits(model, params, images) - _timm_logits(exact, images)).max()
    assert diff > 10 * ATOL


def test_a_pretraining_runs_exported_encoder_loads_into_timm(tmp_path):
    """MAE's encoder (the ViT under `encoder`, no head) as `encoder.npz`: timm's npz reader
    takes it whole, and its pooled features equal ours (class token after the final norm)."""
    from vit_jax import encoder_tree, models_ssl

    plain = _our_model("token")
    encoder = plain.clone(num_classes=0, classifier="token_unpooled")
    mae = models_ssl.MaskedAutoencoder(
        encoder=encoder, decoder_width=16, decoder_depth=1, decoder_heads=2
    )
    variables = mae.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False)
    params = flax.core.unfreeze(variables["params"])
    # Random values everywhere (the init's zero class token would hide a mis-mapping).
    params["encoder"] = _random_params(plain.clone(num_classes=0), seed=3)
    exported, left_out = encoder_tree.encoder_params(params)
    assert left_out and left_out[0].startswith("decoder (MAE decoder")
    path = tmp_path / encoder_tree.ENCODER_FILE
    checkpoint.save(exported, path)

    timm_model = _timm_model("token")
    timm_model.reset_classifier(0)
    timm_vit._load_weights(timm_model, str(path))
    _assert_same_state(_timm_state(timm_model), _timm_state_from_ours(exported))
    images = _images(seed=4)
    ours = _our_logits(plain.clone(num_classes=0), exported, images)
    theirs = _timm_logits(timm_model, images)
    assert ours.shape == theirs.shape == (4, HIDDEN)
    assert np.abs(ours - theirs).max() <= ATOL
