"""`vit_jax.timm_weights`: timm ViT / DeiT state_dicts → our released-format params.

timm models with random weights (every tensor re-drawn, so zero-initialised heads and tokens hide
nothing) at 32 px are saved as `.safetensors`, converted, and our model must compute timm's fp32
eval logits: `vit_tiny_patch16_224` into `ViT-Ti_16` (exact GELU, as timm uses), with and without
a `pre_logits.fc` layer, and `deit_tiny_distilled_patch16_224` into `DeiT-Ti_16-dist`. Then the
command line's round trip and the errors for files that do not fit.

Needs torch, torchvision and timm: `pip install -e '.[interop]'`. With a CPU-only torch,
torchvision's import needs `tests/_torchvision_shim.py`.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests._torchvision_shim import INSTALL, require_timm
from vit_jax import checkpoint, models, models_vit, timm_weights, weights_info
from vit_jax.checkpoint import CheckpointError

torch, timm = require_timm()
safetensors_torch = pytest.importorskip("safetensors.torch", reason=INSTALL)

IMAGE, CLASSES = 32, 10
ATOL = 1e-4  # fp32 logits of magnitude ~1 (measured agreement ~1e-6)


def _randomized(name: str, seed: int = 0, **kwargs):
    model = timm.create_model(name, pretrained=False, img_size=IMAGE, num_classes=CLASSES, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in key and key.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * noise)
            elif key.endswith("weight") and tensor.ndim >= 2:
                tensor.copy_(noise / int(np.prod(tensor.shape[1:])) ** 0.5)
            else:
                tensor.copy_(0.2 * noise)
    return model.eval()


def _save(model, path: Path, extra: dict | None = None) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update(extra or {})
    safetensors_torch.save_file(state, str(path))
    return path


def _inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32)


def _timm_logits(model, x: np.ndarray, zoo_name: str = "ViT-Ti_16") -> np.ndarray:
    """timm's logits for our pipeline's [-1, 1] images, normalised as `zoo_name`'s weights
    expect (DeiT: ImageNet mean/std, which our model computes itself)."""
    mean, std = models_vit.INPUT_NORMS[
        models.MODEL_CONFIGS[zoo_name].get("input_norm", "inception")
    ]
    x = ((x + 1) / 2 - np.array(mean, np.float32)) / np.array(std, np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _our_logits(name: str, params, x: np.ndarray, **overrides) -> np.ndarray:
    num_classes = params["head"]["kernel"].shape[-1]
    model = models.get_model(name, num_classes=num_classes, activation="gelu", **overrides)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    return np.asarray(apply(params, x))


@pytest.mark.parametrize(
    ("timm_name", "zoo_name"),
    [
        ("vit_tiny_patch16_224", "ViT-Ti_16"),
        ("deit_tiny_patch16_224", "DeiT-Ti_16"),
        ("deit_tiny_distilled_patch16_224", "DeiT-Ti_16-dist"),
    ],
)
def test_converted_logits_equal_timms(tmp_path, timm_name, zoo_name):
    reference = _randomized(timm_name)
    path = _save(reference, tmp_path / "model.safetensors")
    params = timm_weights.convert(timm_weights.load_state_dict(path), zoo_name)
    x = _inputs()
    want = _timm_logits(reference, x, zoo_name)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(_our_logits(zoo_name, params, x), want, atol=ATOL, rtol=0)


def test_augreg_style_file_without_pre_logits_and_with_one(tmp_path):
    """timm 1.0's ViT has no pre_logits (AugReg files); older 21k ports have `pre_logits.fc`."""
    reference = _randomized("vit_tiny_patch16_224", depth=2)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert not any(k.startswith("pre_logits") for k in state)
    layers = {"transformer": {"num_layers": 2}}
    params = timm_weights.convert(state, "ViT-Ti_16", **layers)
    assert "pre_logits" not in params
    x = _inputs()
    np.testing.assert_allclose(
        _our_logits("ViT-Ti_16", params, x, **layers), _timm_logits(reference, x), atol=ATOL
    )

    # A representation layer: Dense + tanh before the head (the original ViT-*21k files).
    rng = np.random.default_rng(3)
    width, hidden = 7, state["norm.weight"].shape[0]
    with_rep = dict(state)
    with_rep["pre_logits.fc.weight"] = (rng.normal(size=(width, hidden)) / 8).astype(np.float32)
    with_rep["pre_logits.fc.bias"] = rng.normal(size=width).astype(np.float32)
    with_rep["head.weight"] = rng.normal(size=(CLASSES, width)).astype(np.float32)
    params = timm_weights.convert(with_rep, "ViT-Ti_16", **layers)
    assert params["pre_logits"]["kernel"].shape == (hidden, width)
    with torch.no_grad():
        tokens = reference.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    pooled = tokens[:, 0].numpy()
    rep = np.tanh(pooled @ with_rep["pre_logits.fc.weight"].T + with_rep["pre_logits.fc.bias"])
    want = rep @ with_rep["head.weight"].T + with_rep["head.bias"]
    got = _our_logits("ViT-Ti_16", params, x, representation_size=width, **layers)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_mae_style_encoder_without_head_converts_to_a_features_model():
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, num_classes=0, depth=1
    )
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = timm_weights.convert(
        {"model": state}["model"], "ViT-Ti_16", transformer={"num_layers": 1}
    )
    assert "head" not in params and "cls" in params


def test_command_line_round_trip(tmp_path, capsys):
    reference = _randomized("deit_tiny_distilled_patch16_224")
    path = _save(reference, tmp_path / "deit.safetensors")
    out = tmp_path / "params.npz"
    code = timm_weights.main(["--model=DeiT-Ti_16-dist", f"--checkpoint={path}", f"--out={out}"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "DeiT-Ti_16-dist" in printed and "input_norm='imagenet'" in printed
    record = weights_info.read(out)  # params.npz.json: DeiT was trained on ImageNet mean/std
    assert record["input_norm"] == "imagenet" and record["source"] == "deit.safetensors"
    vit_out = tmp_path / "vit.npz"
    argv = ["--model=DeiT-Ti_16-dist", f"--checkpoint={path}", f"--out={vit_out}"]
    assert timm_weights.main([*argv, "--input_norm=inception"]) == 0
    assert weights_info.read(vit_out)["input_norm"] == "inception"  # as the user says
    params = checkpoint.load(out)
    x = _inputs()
    np.testing.assert_allclose(
        _our_logits("DeiT-Ti_16-dist", params, x),
        _timm_logits(reference, x, "DeiT-Ti_16-dist"),
        atol=ATOL,
        rtol=0,
    )


def test_distilled_file_for_a_plain_model_names_the_distillation_params():
    reference = _randomized("deit_tiny_distilled_patch16_224")
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        timm_weights.convert(state, "DeiT-Ti_16")
    message = str(error.value)
    assert "dist_token" in message and "head_dist.weight" in message
    assert "DeiT-Ti_16-dist" in message  # what the file looks like

    plain = {k: v for k, v in state.items() if not k.startswith(("dist_token", "head_dist"))}
    plain["pos_embed"] = plain["pos_embed"][:, 1:]
    with pytest.raises(CheckpointError, match="no dist_token") as error:
        timm_weights.convert(plain, "DeiT-Ti_16-dist")
    assert "head_dist/kernel" in str(error.value)


def test_file_of_another_size_lists_the_shapes(tmp_path, capsys):
    reference = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=IMAGE, num_classes=CLASSES
    )
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        timm_weights.convert(state, "ViT-Ti_16")
    message = str(error.value)
    assert "cls_token: model expects (1, 1, 192), file has (1, 1, 384)" in message
    assert "more)" in message  # the first few, then a count
    assert "looks like ViT-S_16 or DeiT-S_16" in message

    path = _save(reference, tmp_path / "small.safetensors")
    code = timm_weights.main(
        ["--model=ViT-Ti_16", f"--checkpoint={path}", f"--out={tmp_path / 'p.npz'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "p.npz").exists()


def test_pth_without_torch_says_how_to_read_it(tmp_path, monkeypatch):
    reference = _randomized("vit_tiny_patch16_224", depth=1)
    path = tmp_path / "model.pth"
    torch.save({"model": reference.state_dict()}, path)
    state = timm_weights.load_state_dict(path)  # with torch: the wrapper is unwrapped
    assert "blocks.0.attn.qkv.weight" in state and isinstance(state["cls_token"], np.ndarray)

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"interop extra.*\.safetensors"):
        timm_weights.load_state_dict(path)


def test_unknown_keys_are_listed():
    reference = _randomized("vit_tiny_patch16_224", depth=1)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    state["fc_norm.weight"] = np.ones(192, np.float32)
    with pytest.raises(CheckpointError, match=r"1 unknown key\(s\).*fc_norm.weight"):
        timm_weights.convert(state, "ViT-Ti_16", transformer={"num_layers": 1})


def test_readme_command_parses():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    commands = [
        shlex.split(line)[3:]
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("python -m vit_jax.timm_weights")
    ]
    assert commands
    for args in commands:
        parsed = timm_weights.build_parser().parse_args(args)
        assert parsed.model in models.MODEL_CONFIGS and parsed.checkpoint and parsed.out
