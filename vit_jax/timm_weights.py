"""timm's weights (`vit_*`, `deit_*`, `deit_*_distilled_*`, `swin_*`, `beit_*`) → an `.npz` tree.

timm publishes ViT, AugReg, MAE-encoder, DeiT, Swin and BEiT weights as PyTorch state_dicts
(`.safetensors` on the Hugging Face hub, `.pth` / `.bin` elsewhere). `convert` maps one onto the
parameter tree of a zoo model (our names, the original's: `Transformer/encoderblock_{i}/...`),
and the command line writes it in the released format:

    python -m vit_jax.timm_weights --model=DeiT-S_16-dist \
        --checkpoint=deit_small_distilled_patch16_224.safetensors --out=params.npz

The mapping is strict: every tensor of the file must land in a param of the model, and every
param must be filled with the right shape; otherwise one `CheckpointError` lists the unknown keys,
the missing params and the mis-shaped tensors, and says which zoo model the file looks like.

Swin and BEiT keep timm's names in our tree (`vit_jax.models_swin`, `vit_jax.models_beit`), so
their keys are renamed (`layers.0.blocks.1.attn.qkv.weight` → `layers_0_blocks_1/attn/qkv/kernel`)
and their non-parameter buffers (relative index, attention masks, BEiT's zero `k_bias`) skipped.
A BEiT file's image size is its tables' grid (224 or 384); a Swin file's is the zoo model's.

Layouts: Linear weights are (out, in) in torch and (in, out) here; the patch convolution is OIHW
in torch and HWIO here; timm's fused `attn.qkv` (3·D, D) is split into our query / key / value
kernels (D, heads, head_dim), and `attn.proj` (D, D) becomes `out` (heads, head_dim, D).

The class count comes from the file's `head` (no head, e.g. an MAE encoder: a features model,
num_classes=0), the image size from its position table, and a `pre_logits.fc` layer (older timm
ports of the ImageNet-21k files) sets `representation_size`; AugReg files have none.

Reading `.safetensors` needs only numpy (safetensors' numpy API); `.pth` / `.bin` / `.pt` files
need torch (the `interop` extra) and are read with `weights_only=True`, never unpickling code.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint, models, models_swin, models_vit, relative_positions, weights_info
from vit_jax.checkpoint import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Which timm names map to which zoo names (the README's table).
TIMM_TO_ZOO = {
    "vit_tiny_patch16_*": "ViT-Ti_16",
    "vit_small_patch16_*": "ViT-S_16",
    "vit_small_patch32_*": "ViT-S_32",
    "vit_base_patch16_* (incl. .mae)": "ViT-B_16",
    "vit_base_patch32_*": "ViT-B_32",
    "vit_large_patch16_* (incl. .mae)": "ViT-L_16",
    "vit_large_patch32_*": "ViT-L_32",
    "vit_base_patch8_*": "ViT-B_8",
    "vit_huge_patch14_* (incl. .mae)": "ViT-H_14",
    "deit_{tiny,small,base}_patch16_*": "DeiT-{Ti,S,B}_16",
    "deit_{tiny,small,base}_distilled_patch16_*": "DeiT-{Ti,S,B}_16-dist",
    "swin_{tiny,small,base,large}_patch4_window7_224": "Swin-{T,S,B,L}_4_w7",
    "swin_{base,large}_patch4_window12_384": "Swin-{B,L}_4_w12",
    "beit_{base,large}_patch16_{224,384}": "BEiT-{B,L}_16",
}
_SHOWN = 8  # entries listed per kind of problem

Params = dict[str, Any]
Shape = tuple[int, ...]


# --------------------------------------------------------------------------- reading


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A timm checkpoint file as {name: float32-or-native numpy array}.

    `.safetensors` is read with safetensors' numpy API (no torch needed); `.pth` / `.pt` / `.bin`
    with `torch.load(weights_only=True)`, which needs torch. A `{'model': ...}` or
    `{'state_dict': ...}` wrapper (training checkpoints, the MAE release) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"timm checkpoint not found: {path!r}.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise CheckpointError(
                f"Reading {path!r} needs the safetensors package: pip install safetensors "
                "(or pip install -e '.[interop]')."
            ) from None
        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path!r} is not a readable .safetensors file: {e}") from None
    elif suffix in TORCH_SUFFIXES:
        state = _load_torch(path)
    else:
        raise CheckpointError(
            f"Unknown timm checkpoint type {path!r}: expected {SAFETENSORS_SUFFIX} or one of "
            f"{', '.join(TORCH_SUFFIXES)}."
        )
    return _unwrap(state, path)


def _load_torch(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"Reading the PyTorch file {path!r} needs torch, which is not installed: install the "
            "interop extra (pip install -e '.[interop]'), or convert the file to .safetensors "
            "(safetensors.torch.save_file(torch.load(path), 'model.safetensors')) where torch is "
            "available; .safetensors files need only numpy."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of many kinds
        raise CheckpointError(
            f"{path!r} could not be read with torch.load(weights_only=True): {e}"
        ) from None

    def to_numpy(value):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.dtype == torch.bfloat16:
                value = value.float()
            return value.numpy()
        return value

    if isinstance(state, Mapping):
        return {
            k: (
                {kk: to_numpy(vv) for kk, vv in v.items()}
                if isinstance(v, Mapping)
                else to_numpy(v)
            )
            for k, v in state.items()
        }
    return state


def _unwrap(state: Any, path: str) -> dict[str, np.ndarray]:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(state).__name__}, not a state_dict.")
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    others = sorted(k for k in state if k not in arrays)
    if others:
        raise CheckpointError(
            f"{path!r}: entries that are not tensors: {_first(others)}. Expected a timm "
            "state_dict (optionally under 'model' or 'state_dict')."
        )
    if not arrays:
        raise CheckpointError(f"{path!r} holds no tensors.")
    return arrays


# --------------------------------------------------------------------------- the mapping


class _Rule:
    """One timm tensor → one or more of our params (flat '/'-joined names)."""

    def __init__(
        self,
        targets: Sequence[str],
        timm_shape: Callable[[list[Shape]], Shape],
        to_ours: Callable[[np.ndarray, list[Shape]], list[np.ndarray]],
    ):
        self.targets = list(targets)
        self.timm_shape = timm_shape
        self.to_ours = to_ours


def _same(target: str) -> _Rule:
    return _Rule([target], lambda s: s[0], lambda x, s: [x])


def _linear_weight(target: str) -> _Rule:  # (out, in) → (in, out)
    return _Rule([target], lambda s: s[0][::-1], lambda x, s: [x.T])


def _conv_weight(target: str) -> _Rule:  # OIHW → HWIO
    return _Rule(
        [target],
        lambda s: (s[0][3], s[0][2], s[0][0], s[0][1]),
        lambda x, s: [x.transpose(2, 3, 1, 0)],
    )


def _qkv_weight(prefix: str) -> _Rule:  # (3·h·d, D) → 3 × (D, h, d)
    def to_ours(x, shapes):
        d_model, heads, head_dim = shapes[0]
        parts = x.reshape(3, heads * head_dim, d_model)
        return [p.T.reshape(d_model, heads, head_dim) for p in parts]

    return _Rule(
        [f"{prefix}/{p}/kernel" for p in ("query", "key", "value")],
        lambda s: (3 * s[0][1] * s[0][2], s[0][0]),
        to_ours,
    )


def _qkv_bias(prefix: str) -> _Rule:  # (3·h·d,) → 3 × (h, d)
    return _Rule(
        [f"{prefix}/{p}/bias" for p in ("query", "key", "value")],
        lambda s: (3 * s[0][0] * s[0][1],),
        lambda x, s: list(x.reshape(3, *s[0])),
    )


def _out_weight(target: str) -> _Rule:  # (D, h·d) → (h, d, D)
    return _Rule(
        [target],
        lambda s: (s[0][2], s[0][0] * s[0][1]),
        lambda x, s: [x.T.reshape(s[0])],
    )


def _rules(num_layers: int) -> dict[str, _Rule]:
    """Every timm key a ViT-layout model can have, with where it goes in our tree."""
    rules = {
        "cls_token": _same("cls"),
        "dist_token": _same("dist_token"),
        "pos_embed": _same("Transformer/posembed_input/pos_embedding"),
        "patch_embed.proj.weight": _conv_weight("embedding/kernel"),
        "patch_embed.proj.bias": _same("embedding/bias"),
        "norm.weight": _same("Transformer/encoder_norm/scale"),
        "norm.bias": _same("Transformer/encoder_norm/bias"),
    }
    for timm_name, ours in (
        ("head", "head"),
        ("head_dist", "head_dist"),
        ("pre_logits.fc", "pre_logits"),
    ):
        rules[f"{timm_name}.weight"] = _linear_weight(f"{ours}/kernel")
        rules[f"{timm_name}.bias"] = _same(f"{ours}/bias")
    for i in range(num_layers):
        src, dst = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        attention = f"{dst}/MultiHeadDotProductAttention_0"
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            rules[f"{src}.{norm}.weight"] = _same(f"{dst}/{ln}/scale")
            rules[f"{src}.{norm}.bias"] = _same(f"{dst}/{ln}/bias")
        rules[f"{src}.attn.qkv.weight"] = _qkv_weight(attention)
        rules[f"{src}.attn.qkv.bias"] = _qkv_bias(attention)
        rules[f"{src}.attn.proj.weight"] = _out_weight(f"{attention}/out/kernel")
        rules[f"{src}.attn.proj.bias"] = _same(f"{attention}/out/bias")
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            rules[f"{src}.mlp.{fc}.weight"] = _linear_weight(f"{dst}/MlpBlock_0/{dense}/kernel")
            rules[f"{src}.mlp.{fc}.bias"] = _same(f"{dst}/MlpBlock_0/{dense}/bias")
    return rules


def _beit_path(key: str) -> tuple[str, ...] | None:
    """timm BEiT key → our path (`blocks.3.attn.qkv.weight` → blocks_3/attn/qkv/kernel)."""
    parts = key.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        parts = [f"blocks_{parts[1]}", *parts[2:]]
    top = ("cls_token", "patch_embed", "fc_norm", "head")
    if parts[0] not in top and not parts[0].startswith("blocks_"):
        return None
    if parts[-1] == "weight":
        parts[-1] = "scale" if "norm" in parts[-2] else "kernel"
    return tuple(parts)


# family: (timm key → our path or None, suffixes of timm's non-parameter buffers to skip)
NAMED_LAYOUTS: dict[str, tuple[Callable[[str], tuple[str, ...] | None], tuple[str, ...]]] = {
    "swin": (models_swin.timm_path, ("relative_position_index", "attn_mask")),
    "beit": (_beit_path, ("relative_position_index", "k_bias")),
}


def _named_rules(
    state_dict: Mapping[str, np.ndarray], path_of: Callable[[str], tuple[str, ...] | None]
) -> dict[str, _Rule]:
    """Rules for a layout whose names we keep: each key renamed, kernels transposed."""
    rules = {}
    for key, value in state_dict.items():
        path = path_of(key)
        if path is None:
            continue
        target = "/".join(path)
        if path[-1] != "kernel":
            rules[key] = _same(target)
        elif np.ndim(value) == 4:
            rules[key] = _conv_weight(target)
        else:
            rules[key] = _linear_weight(target)
    return rules


def expected_params(
    state_dict: Mapping[str, np.ndarray],
    model_name: str,
    image_size: int | None = None,
    **overrides: Any,
) -> tuple[Params, int]:
    """The shapes of the params `model_name` needs for this file, and the image size used.

    The class count is the file's head's (0 without one), `representation_size` that of its
    `pre_logits.fc` (None without one), the image size the one its position table was made for
    (224 when the table is absent or not a square grid: the shape check then reports it).
    """
    if "head.weight" in state_dict:
        num_classes = int(np.shape(state_dict["head.weight"])[0])
    elif "head.fc.weight" in state_dict:  # Swin
        num_classes = int(np.shape(state_dict["head.fc.weight"])[0])
    elif "head_dist.weight" in state_dict:
        num_classes = int(np.shape(state_dict["head_dist.weight"])[0])
    else:
        num_classes = 0
    if "pre_logits.fc.weight" in state_dict:
        overrides.setdefault(
            "representation_size", int(np.shape(state_dict["pre_logits.fc.weight"])[0])
        )
    model = models.get_model(model_name, num_classes=num_classes, **overrides)
    patch = int(model.patches.size[0]) if getattr(model, "patches", None) else 16
    special = int(getattr(model, "classifier", "") in ("token", "token_unpooled")) + int(
        bool(getattr(model, "distilled", False))
    )
    given, image_size = image_size, models.default_image_size(model_name)
    pos = state_dict.get("pos_embed")
    table = state_dict.get(f"blocks.0.attn.{relative_positions.TABLE}")
    if given:
        image_size = int(given)
    elif models.family(model_name) == "beit" and table is not None:  # the grid its tables are for
        side = math.isqrt(max(np.shape(table)[0] - relative_positions.CLASS_TOKEN_ROWS, 1))
        image_size = (side + 1) // 2 * patch
    elif pos is not None and np.ndim(pos) == 3:
        side = math.isqrt(max(np.shape(pos)[1] - special, 0))
        if side > 0 and side * side == np.shape(pos)[1] - special:
            image_size = side * patch
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False
        )
    )["params"]
    return checkpoint._as_plain_dict(shapes), image_size


def convert(
    state_dict: Mapping[str, np.ndarray],
    model_name: str,
    image_size: int | None = None,
    **overrides: Any,
) -> Params:
    """timm ViT / DeiT / Swin / BEiT state_dict → the params tree of zoo model `model_name`.

    `overrides` are model overrides (as for `models.get_model`), e.g. a smaller depth for tests.
    `image_size` is the resolution the shapes are checked at (default: the file's, as far as
    its tables tell, else the zoo model's: 224, 384 for window-12 Swin).
    Raises one CheckpointError listing every unknown key, missing param and mis-shaped tensor.
    """
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    expected, _ = expected_params(state_dict, model_name, image_size, **overrides)
    want = {k: tuple(v.shape) for k, v in checkpoint.flatten(expected).items()}
    dtypes = {k: v.dtype for k, v in checkpoint.flatten(expected).items()}
    family = models.family(model_name)
    if family in NAMED_LAYOUTS:  # Swin, BEiT: our tree has timm's names
        path_of, buffers = NAMED_LAYOUTS[family]
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(buffers)}
        rules = _named_rules(state_dict, path_of)
    else:
        num_layers = sum(
            1 for k in expected.get("Transformer", {}) if k.startswith("encoderblock_")
        )
        file_layers = 1 + max(
            (
                int(k.split(".")[1])
                for k in state_dict
                if k.startswith("blocks.") and k.split(".")[1].isdigit()
            ),
            default=-1,
        )
        rules = _rules(max(num_layers, file_layers))

    flat: dict[str, np.ndarray] = {}
    unknown, mismatched, covered = [], [], set()
    for key in sorted(state_dict, key=_blocks_last):
        rule = rules.get(key)
        if rule is None or any(t not in want for t in rule.targets):
            unknown.append(key)
            continue
        shapes = [want[t] for t in rule.targets]
        timm_shape = tuple(rule.timm_shape(shapes))
        got = tuple(state_dict[key].shape)
        if got != timm_shape:
            mismatched.append(f"{key}: model expects {timm_shape}, file has {got}")
            covered.update(rule.targets)
            continue
        for target, value in zip(rule.targets, rule.to_ours(state_dict[key], shapes), strict=True):
            flat[target] = np.ascontiguousarray(value, dtype=dtypes[target])
    missing = sorted((k for k in want if k not in flat and k not in covered), key=_natural)
    if unknown or missing or mismatched:
        raise CheckpointError(_report(model_name, state_dict, unknown, missing, mismatched))
    return checkpoint.unflatten(flat)


def _report(model_name, state_dict, unknown, missing, mismatched) -> str:
    lines = [f"The timm checkpoint does not fit {model_name}:"]
    if unknown:
        lines.append(
            f"  {len(unknown)} unknown key(s) (no param of {model_name}): {_first(unknown)}"
        )
    if missing:
        lines.append(f"  {len(missing)} param(s) the file does not fill: {_first(missing)}")
    if mismatched:
        lines.append(
            f"  {len(mismatched)} tensor(s) of the wrong shape (timm layout): "
            + "; ".join(mismatched[:_SHOWN])
            + (f"; ... ({len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else "")
        )
    hint = _looks_like(state_dict, model_name)
    if hint:
        lines.append(f"  {hint}")
    return "\n".join(lines)


def _looks_like(state_dict: Mapping[str, np.ndarray], model_name: str) -> str:
    """A sentence naming the zoo model(s) the file's architecture matches, if any."""
    config = models.MODEL_CONFIGS[model_name]
    distilled = "dist_token" in state_dict
    model_distilled = bool(config.get("distilled", False))
    parts = []
    family = models.family(model_name)
    if "layers.0.blocks.0.attn.relative_position_bias_table" in state_dict and family != "swin":
        parts.append("the file is a Swin (layers.*.blocks.*): use a Swin-* model")
    if "blocks.0.attn.relative_position_bias_table" in state_dict and family != "beit":
        parts.append("the file is a BEiT (blocks.*.gamma_1, relative tables): use BEiT-*_16")
    if distilled and not model_distilled:
        parts.append(
            "the file is a distilled DeiT (it has dist_token and head_dist), the model is not"
        )
    elif model_distilled and not distilled:
        parts.append("the model is a distilled DeiT but the file has no dist_token / head_dist")
    if "cls_token" in state_dict and "patch_embed.proj.weight" in state_dict:
        hidden = int(np.shape(state_dict["cls_token"])[-1])
        patch = int(np.shape(state_dict["patch_embed.proj.weight"])[-1])
        layers = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        matches = [
            name
            for name, c in models.MODEL_CONFIGS.items()
            if name.startswith(("ViT-", "DeiT-"))
            and c.get("resnet") is None
            and c.get("hidden_size") == hidden
            and c.transformer.num_layers == layers
            and tuple(c.patches.size) == (patch, patch)
            and bool(c.get("distilled", False)) == distilled
            and (name.startswith("DeiT-") or not distilled)
            and c.get("classifier") == "token"
        ]
        if matches and model_name not in matches:
            parts.append(
                f"the file looks like {' or '.join(matches)} (width {hidden}, "
                f"{layers} blocks, patch {patch})"
            )
    return ("Hint: " + "; ".join(parts) + ".") if parts else ""


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.replace("/", ".").split(".")]


def _blocks_last(key: str) -> tuple:
    """Tokens, embedding and heads first (they tell the size), then the blocks in order."""
    return (key.startswith("blocks."), _natural(key))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vit_jax.timm_weights",
        description="Convert timm ViT / DeiT / Swin / BEiT weights to an .npz of a zoo model.",
    )
    parser.add_argument("--model", required=True, help="Zoo model name, e.g. DeiT-S_16-dist.")
    parser.add_argument(
        "--checkpoint", required=True, help="timm weights: .safetensors, or .pth/.bin (torch)."
    )
    parser.add_argument("--out", required=True, help="The .npz to write, e.g. params.npz.")
    parser.add_argument(
        "--input_norm",
        choices=tuple(models_vit.INPUT_NORMS),
        help="The pixel normalisation the weights were trained with (timm's pretrained_cfg "
        "mean/std): 'imagenet' for DeiT and MAE, 'inception' (0.5, 0.5) for AugReg and the "
        "original's ports. Default: the zoo model's. Recorded beside --out as <out>.json.",
    )
    parser.add_argument("--verbose", action="store_true", help="Show tracebacks of errors.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (2 on errors, with a one-line message)."""
    args = build_parser().parse_args(argv)
    try:
        params = convert(load_state_dict(args.checkpoint), args.model)
        zoo_norm = models.get_config(args.model).get("input_norm", weights_info.DEFAULT_INPUT_NORM)
        input_norm = args.input_norm or zoo_norm
        checkpoint.save(params, args.out)
        weights_info.write(
            args.out,
            input_norm=input_norm,
            model=args.model,
            source=os.path.basename(args.checkpoint),
        )
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        if args.verbose:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 2
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    print(
        f"wrote {args.out}: {args.model}, {count:,} params; input_norm={input_norm!r} "
        f"(recorded in {weights_info.info_path(args.out)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
