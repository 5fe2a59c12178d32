"""DeiT against timm: the zoo's parameter counts and a distilled model's logits.

- every `DeiT-*` zoo entry has exactly the parameter count of timm's `deit_*_patch16_224` /
  `deit_*_distilled_patch16_224` at 1000 classes (the same numbers are hard-asserted in
  tests/test_models.py, so they are checked without timm too);
- timm's `deit_tiny_distilled_patch16_224` with random weights (every tensor re-drawn, so the
  zero-initialised heads and tokens hide nothing) at 32 px, its state_dict mapped by hand into
  our `DeiT-Ti_16-dist` tree, computes our logits in fp32: both heads separately (our
  `train=True` pair, with dropout off) and the eval output (timm's mean of the two heads).

Needs torch, torchvision and timm: `pip install -e '.[interop]'`. With a CPU-only torch,
torchvision's import needs `tests/_torchvision_shim.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._torchvision_shim import require_timm
from vit_jax import models, models_vit

torch, timm = require_timm()

TIMM_NAMES = {
    "DeiT-Ti_16": "deit_tiny_patch16_224",
    "DeiT-S_16": "deit_small_patch16_224",
    "DeiT-B_16": "deit_base_patch16_224",
    "DeiT-Ti_16-dist": "deit_tiny_distilled_patch16_224",
    "DeiT-S_16-dist": "deit_small_distilled_patch16_224",
    "DeiT-B_16-dist": "deit_base_distilled_patch16_224",
}
# Measured (timm 1.0.31, torch 2.13 CPU): every count equal; fp32 logits of magnitude ~1.5 agree
# to 1.7e-6, while the tanh GELU is off by 3.7e-4.
ATOL = 1e-4


def _our_count(name: str) -> int:
    model = models.get_model(name, num_classes=1000)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_deit_param_counts_equal_timms(name):
    reference = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
    assert sum(p.numel() for p in reference.parameters()) == _our_count(name)


def _randomized_timm_deit(image: int, classes: int, seed: int = 0):
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=image, num_classes=classes
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * noise)
            elif name.endswith("weight") and tensor.ndim >= 2:
                fan_in = int(np.prod(tensor.shape[1:]))
                tensor.copy_(noise / fan_in**0.5)
            else:  # biases, class / distillation tokens, position table
                tensor.copy_(0.2 * noise)
    return model.eval()


def _to_ours(state: dict[str, np.ndarray], num_layers: int, heads: int) -> dict:
    """timm's DeiT state_dict → our VisionTransformer tree (written from the two layouts)."""

    def dense(prefix):
        return {"kernel": state[f"{prefix}.weight"].T, "bias": state[f"{prefix}.bias"]}

    def norm(prefix):
        return {"scale": state[f"{prefix}.weight"], "bias": state[f"{prefix}.bias"]}

    hidden = state["cls_token"].shape[-1]
    head_dim = hidden // heads
    transformer = {
        "posembed_input": {"pos_embedding": state["pos_embed"]},
        "encoder_norm": norm("norm"),
    }
    for i in range(num_layers):
        block = f"blocks.{i}"
        qkv_w = state[f"{block}.attn.qkv.weight"].reshape(3, hidden, hidden)  # (q|k|v, out, in)
        qkv_b = state[f"{block}.attn.qkv.bias"].reshape(3, heads, head_dim)
        attention = {
            part: {
                "kernel": qkv_w[j].T.reshape(hidden, heads, head_dim),
                "bias": qkv_b[j],
            }
            for j, part in enumerate(("query", "key", "value"))
        }
        attention["out"] = {
            "kernel": state[f"{block}.attn.proj.weight"].T.reshape(heads, head_dim, hidden),
            "bias": state[f"{block}.attn.proj.bias"],
        }
        transformer[f"encoderblock_{i}"] = {
            "LayerNorm_0": norm(f"{block}.norm1"),
            "MultiHeadDotProductAttention_0": attention,
            "LayerNorm_1": norm(f"{block}.norm2"),
            "MlpBlock_0": {
                "Dense_0": dense(f"{block}.mlp.fc1"),
                "Dense_1": dense(f"{block}.mlp.fc2"),
            },
        }
    return {
        "cls": state["cls_token"],
        "dist_token": state["dist_token"],
        "embedding": {
            "kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW → HWIO
            "bias": state["patch_embed.proj.bias"],
        },
        "Transformer": transformer,
        "head": dense("head"),
        "head_dist": dense("head_dist"),
    }


def test_distilled_deit_tiny_logits_equal_timms():
    image, classes = 32, 10
    reference = _randomized_timm_deit(image, classes)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    ours = models.get_model("DeiT-Ti_16-dist", num_classes=classes)
    config = models.MODEL_CONFIGS["DeiT-Ti_16-dist"].transformer
    params = _to_ours(state, config.num_layers, config.num_heads)
    expected = jax.eval_shape(
        lambda: ours.init(jax.random.key(0), jnp.zeros((1, image, image, 3)), train=False)
    )["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(
        lambda x: x.shape, expected
    )

    x = np.random.default_rng(1).uniform(-1, 1, (3, image, image, 3)).astype(np.float32)
    # The pipelines give [-1, 1]; timm's DeiT takes ImageNet mean/std-normalised pixels, which
    # the zoo's DeiT (input_norm='imagenet') computes from them itself.
    mean, std = (np.array(v, np.float32) for v in models_vit.INPUT_NORMS["imagenet"])
    x_timm = ((x + 1) / 2 - mean) / std
    with torch.no_grad():
        x_torch = torch.from_numpy(x_timm.transpose(0, 3, 1, 2).copy())
        features = reference.forward_features(x_torch)
        want_cls = reference.head(features[:, 0]).numpy()
        want_dist = reference.head_dist(features[:, 1]).numpy()
        want = reference(x_torch).numpy()  # eval: the mean of the two heads
    np.testing.assert_allclose(want, (want_cls + want_dist) / 2, atol=1e-6)
    assert np.abs(want_cls - want_dist).max() > 0.1 and np.abs(want).max() > 0.5

    got = jax.jit(lambda p, x: ours.apply({"params": p}, x, train=False))(params, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
    got_cls, got_dist = jax.jit(lambda p, x: ours.apply({"params": p}, x, train=True))(params, x)
    np.testing.assert_allclose(np.asarray(got_cls), want_cls, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got_dist), want_dist, atol=ATOL, rtol=0)
    # The exact GELU matters at this tolerance: the tanh form is visibly off.
    tanh = ours.clone(activation="gelu_tanh")
    off = jax.jit(lambda p, x: tanh.apply({"params": p}, x, train=False))(params, x)
    assert np.abs(np.asarray(off) - want).max() > 10 * np.abs(np.asarray(got) - want).max()
    unnormalised = ours.clone(input_norm="inception")  # and so does the input normalisation
    off = jax.jit(lambda p, x: unnormalised.apply({"params": p}, x, train=False))(params, x)
    assert np.abs(np.asarray(off) - want).max() > 10 * np.abs(np.asarray(got) - want).max()
