"""The model zoo: every released model's configuration, by name, and `get_model`.

`MODEL_CONFIGS[name]` is a frozen ml_collections config holding the constructor arguments of
`VisionTransformer`, `MlpMixer`, `SwinTransformer` or `Beit` (all but `num_classes`), so
`VisionTransformer(num_classes=10, **MODEL_CONFIGS['ViT-B_16'])` works as in the original.
Sizes live in one table per family below; the tiny `testing*` models live in the same tables.
Besides the original's models the zoo has DeiT (`DeiT-{Ti,S,B}_16` and the distilled
`DeiT-{Ti,S,B}_16-dist`), whose configs add `activation='gelu'`, `input_norm='imagenet'` and
`distilled` to the ViT table row of their size; Swin (`Swin-{T,S,B,L}_4_w7`, `Swin-{B,L}_4_w12`)
and BEiT (`BEiT-{B,L}_16`), timm's models of those names (`family` says which is which).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import ml_collections

from vit_jax.models_beit import Beit
from vit_jax.models_mixer import MlpMixer
from vit_jax.models_swin import SWIN_CONFIGS, SwinTransformer
from vit_jax.models_vit import VisionTransformer, check_num_classes

__all__ = [
    "MODEL_CONFIGS",
    "NOT_IN_ORIGINAL",
    "Beit",
    "MlpMixer",
    "SwinTransformer",
    "VisionTransformer",
    "check_model_config",
    "get_config",
    "get_model",
    "model_config",
]

# name: (hidden, mlp_dim, heads, layers, patch, dropout, resnet (units per stage, width) or None,
#        classifier)
_VIT_TABLE: dict[str, tuple] = {
    "testing": (10, 10, 2, 1, 16, 0.1, None, "token"),
    "testing-unpooled": (10, 10, 2, 1, 16, 0.1, None, "unpooled"),
    "ViT-Ti_16": (192, 768, 3, 12, 16, 0.0, None, "token"),
    "ViT-S_16": (384, 1536, 6, 12, 16, 0.0, None, "token"),
    "ViT-S_32": (384, 1536, 6, 12, 32, 0.0, None, "token"),
    "ViT-B_16": (768, 3072, 12, 12, 16, 0.0, None, "token"),
    "ViT-B_32": (768, 3072, 12, 12, 32, 0.0, None, "token"),
    "ViT-B_8": (768, 3072, 12, 12, 8, 0.0, None, "token"),
    "ViT-L_16": (1024, 4096, 16, 24, 16, 0.1, None, "token"),
    "ViT-L_32": (1024, 4096, 16, 24, 32, 0.0, None, "token"),
    "ViT-H_14": (1280, 5120, 16, 32, 14, 0.1, None, "token"),
    "ViT-S_16-gap-norep": (384, 1536, 6, 12, 16, 0.0, None, "gap"),
    "ViT-S_32-gap-norep": (384, 1536, 6, 12, 32, 0.0, None, "gap"),
    "ViT-B_16-gap-norep": (768, 3072, 12, 12, 16, 0.0, None, "gap"),
    "ViT-B_32-gap-norep": (768, 3072, 12, 12, 32, 0.0, None, "gap"),
    "R+ViT-Ti_16": (192, 768, 3, 12, 8, 0.0, ((), 1), "token"),
    "R26+ViT-S_32": (384, 1536, 6, 12, 1, 0.0, ((2, 2, 2, 2), 1), "token"),
    "R26+ViT-B_32": (768, 3072, 12, 12, 1, 0.0, ((2, 2, 2, 2), 1), "token"),
    "R50+ViT-B_16": (768, 3072, 12, 12, 1, 0.1, ((3, 4, 9), 1), "token"),
    "R50+ViT-L_32": (1024, 4096, 16, 24, 1, 0.1, ((3, 4, 6, 3), 1), "token"),
}

# DeiT (ImageNet-1k only, trained in PyTorch): the ViT of the same size with exact GELU, and the
# distilled variants with a distillation token and its head `head_dist`. Not in the original zoo.
# name: (ViT table row it shares, distilled)
_DEIT_TABLE: dict[str, tuple[str, bool]] = {
    "DeiT-Ti_16": ("ViT-Ti_16", False),
    "DeiT-S_16": ("ViT-S_16", False),
    "DeiT-B_16": ("ViT-B_16", False),
    "DeiT-Ti_16-dist": ("ViT-Ti_16", True),
    "DeiT-S_16-dist": ("ViT-S_16", True),
    "DeiT-B_16-dist": ("ViT-B_16", True),
}
# Swin (timm's swin_*_patch4_window*, `vit_jax.models_swin.SWIN_CONFIGS`) and a tiny one for
# tests: 2 px patches, one stage of a plain and a shifted block, window 2.
# name: (embed_dim, depths, heads, window)
_SWIN_TABLE: dict[str, tuple] = {
    "testing-swin": (32, (2,), (2,), 2),
    **{
        n: (c["embed_dim"], c["depths"], c["num_heads"], c["window_size"])
        for n, c in SWIN_CONFIGS.items()
    },
}
# BEiT (timm's beit_{base,large}_patch16_*) and a tiny one for tests.
# name: (hidden, layers, heads, mlp_dim, patch, LayerScale init)
_BEIT_TABLE: dict[str, tuple] = {
    "testing-beit": (64, 1, 4, 128, 16, 0.1),
    "BEiT-B_16": (768, 12, 12, 3072, 16, 0.1),
    "BEiT-L_16": (1024, 24, 16, 4096, 16, 1e-5),
}
# The zoo entries the original package does not have (so no original config function names them).
NOT_IN_ORIGINAL = (*_DEIT_TABLE, *_SWIN_TABLE, *_BEIT_TABLE)

# name: (hidden, blocks, tokens_mlp_dim, channels_mlp_dim, patch)
_MIXER_TABLE: dict[str, tuple] = {
    "Mixer-B_16": (768, 12, 384, 3072, 16),
    "Mixer-B_32": (768, 12, 384, 3072, 32),
    "Mixer-L_16": (1024, 24, 512, 4096, 16),
}


def _vit_config(name: str, row: tuple) -> ml_collections.ConfigDict:
    hidden, mlp_dim, heads, layers, patch, dropout, resnet, classifier = row
    config = ml_collections.ConfigDict()
    config.model_name = name
    config.patches = ml_collections.ConfigDict({"size": (patch, patch)})
    config.hidden_size = hidden
    config.transformer = ml_collections.ConfigDict(
        {
            "mlp_dim": mlp_dim,
            "num_heads": heads,
            "num_layers": layers,
            "attention_dropout_rate": 0.0,
            "dropout_rate": dropout,
        }
    )
    if resnet is not None:
        config.resnet = ml_collections.ConfigDict(
            {"num_layers": resnet[0], "width_factor": resnet[1]}
        )
    else:
        config.resnet = None
    config.classifier = classifier
    config.representation_size = None
    # Declared for every ViT so the command line can set them (--config.model.activation=gelu
    # --config.model.input_norm=imagenet for an MAE encoder converted from timm).
    config.activation = "gelu_tanh"
    config.input_norm = "inception"
    return config


def _deit_config(name: str, row: tuple[str, bool]) -> ml_collections.ConfigDict:
    base, distilled = row
    config = _vit_config(name, _VIT_TABLE[base])
    config.activation = "gelu"
    config.distilled = distilled
    config.input_norm = "imagenet"  # trained on ImageNet mean/std-normalised pixels
    return config


def _mixer_config(name: str, row: tuple) -> ml_collections.ConfigDict:
    hidden, blocks, tokens_mlp_dim, channels_mlp_dim, patch = row
    return ml_collections.ConfigDict(
        {
            "model_name": name,
            "patches": {"size": (patch, patch)},
            "hidden_dim": hidden,
            "num_blocks": blocks,
            "tokens_mlp_dim": tokens_mlp_dim,
            "channels_mlp_dim": channels_mlp_dim,
        }
    )


def _swin_config(name: str, row: tuple) -> ml_collections.ConfigDict:
    embed_dim, depths, heads, window = row
    return ml_collections.ConfigDict(
        {
            "model_name": name,
            "embed_dim": embed_dim,
            "depths": depths,
            "num_heads": heads,
            "window_size": window,
            "patch_size": 2 if name.startswith("testing") else 4,
            "input_norm": "imagenet",  # trained on ImageNet mean/std-normalised pixels
        }
    )


def _beit_config(name: str, row: tuple) -> ml_collections.ConfigDict:
    hidden, layers, heads, mlp_dim, patch, layer_scale = row
    return ml_collections.ConfigDict(
        {
            "model_name": name,
            "patches": {"size": (patch, patch)},
            "hidden_size": hidden,
            "num_layers": layers,
            "num_heads": heads,
            "mlp_dim": mlp_dim,
            "layer_scale_init": layer_scale,
            "input_norm": "inception",  # BEiT's mean = std = 0.5: the pipelines' [-1, 1]
        }
    )


# The fields that fix a zoo model's architecture; a config named after a zoo model must have the
# zoo's values for them (Swin's window_size is not one: fine-tuning at 384 px changes it, the
# relative position tables being resampled). The rest (dropout, representation_size,
# head_bias_init, num_classes, head_hidden_size, drop_path_rate and the speed options) are
# options a recipe sets.
ARCHITECTURE_FIELDS = (
    "patches.size",
    "hidden_size",
    "transformer.mlp_dim",
    "transformer.num_heads",
    "transformer.num_layers",
    "resnet.num_layers",
    "resnet.width_factor",
    "classifier",
    "hidden_dim",
    "num_blocks",
    "tokens_mlp_dim",
    "channels_mlp_dim",
    "activation",
    "distilled",
    "embed_dim",
    "depths",
    "num_heads",
    "patch_size",
    "num_layers",
    "mlp_dim",
)
# What an architecture field absent from a config means (the model's default), so a config that
# spells out a default matches a zoo entry that leaves it out.
_FIELD_DEFAULTS = {"activation": "gelu_tanh", "distilled": False}
# Zoo entries whose architecture fields a config may set freely (the tiny test-bed models,
# e.g. sized up by the offline default job).
FREE_FORM = ("testing", "testing-unpooled", "testing-swin", "testing-beit")

MODEL_CONFIGS: dict[str, ml_collections.FrozenConfigDict] = {
    **{n: ml_collections.FrozenConfigDict(_vit_config(n, r)) for n, r in _VIT_TABLE.items()},
    **{n: ml_collections.FrozenConfigDict(_deit_config(n, r)) for n, r in _DEIT_TABLE.items()},
    **{n: ml_collections.FrozenConfigDict(_mixer_config(n, r)) for n, r in _MIXER_TABLE.items()},
    **{n: ml_collections.FrozenConfigDict(_swin_config(n, r)) for n, r in _SWIN_TABLE.items()},
    **{n: ml_collections.FrozenConfigDict(_beit_config(n, r)) for n, r in _BEIT_TABLE.items()},
}
# Zoo entries whose windows do not tile 224 px: their timm models' resolution.
_IMAGE_SIZES = {n: 384 for n, r in _SWIN_TABLE.items() if r[3] == 12}


def default_image_size(name: str) -> int:
    """The resolution zoo model `name` is counted and benchmarked at: 224, or 384 for the
    window-12 Swin models (whose windows do not tile 224)."""
    _check_name(name)
    return _IMAGE_SIZES.get(name, 224)


def family(name: str) -> str:
    """'vit', 'mixer', 'swin' or 'beit': which model class and options zoo model `name` has."""
    _check_name(name)
    if name in _SWIN_TABLE:
        return "swin"
    if name in _BEIT_TABLE:
        return "beit"
    return "mixer" if name.startswith("Mixer-") else "vit"


_CLASSES = {"vit": VisionTransformer, "mixer": MlpMixer, "swin": SwinTransformer, "beit": Beit}


def _check_name(name: str) -> None:
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown model name {name!r}.{hint} Known models: {', '.join(MODEL_CONFIGS)}."
        )


def get_config(name: str) -> ml_collections.ConfigDict:
    """A mutable copy of the zoo config `name` (changing it never changes the zoo)."""
    _check_name(name)
    return ml_collections.ConfigDict(MODEL_CONFIGS[name].as_configdict().to_dict())


def model_class(name: str) -> type[nn.Module]:
    """The class of zoo model `name`: `VisionTransformer`, `MlpMixer`, `SwinTransformer` or
    `Beit` (`family`)."""
    return _CLASSES[family(name)]


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The zoo config `name` with constructor overrides applied and checked.

    A Mapping given for a nested config (`transformer=dict(dropout_rate=0.)`) updates only the
    keys it names. Keys the model does not have are rejected, listing the valid ones.
    """
    cls = model_class(name)
    config = get_config(name)
    valid = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"{cls.__name__} ({name}) has no option(s) {unknown}; valid: {sorted(valid)}."
        )
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(config.get(key), ml_collections.ConfigDict):
            nested_valid = sorted(config[key].keys())
            nested_unknown = sorted(set(value) - set(nested_valid))
            if nested_unknown:
                raise ValueError(
                    f"{cls.__name__} ({name}) {key} has no option(s) {nested_unknown}; "
                    f"valid: {nested_valid}."
                )
            config[key].update(dict(value))
        else:
            config[key] = value
    return config


def check_model_config(config: Mapping[str, Any]) -> None:
    """ValueError unless `config.model_name` is a zoo name whose architecture `config` has.

    The name picks the class and names the run; it does not set the fields, so a config whose
    name says ViT-B_16 but whose fields are another model's would train (and record) the wrong
    model. The `FREE_FORM` test-bed entries may take any size.
    """
    name = config.get("model_name")
    _check_name(name)
    if name in FREE_FORM:
        return
    zoo = MODEL_CONFIGS[name]
    differences = []
    for field in ARCHITECTURE_FIELDS:
        got, want = _field_value(config, field), _field_value(zoo, field)
        if got != want:
            differences.append(f"{field} {got} ({name}: {want})")
    if differences:
        raise ValueError(
            f"config.model.model_name={name!r}, but the model's fields are not {name}'s: "
            f"{'; '.join(differences)}. The name alone does not choose the model: pick it with "
            f"the recipe argument (--config=configs/finetune.py:{name},<dataset> or "
            f"--config=configs/pretrain.py:{name}); for a model of another size start from "
            f"{FREE_FORM[0]!r}, the zoo's free-form entry."
        )


def _field_value(config: Any, dotted: str) -> Any:
    """The value at `dotted` ('a.b'), with sequences as tuples; None where it is absent."""
    node = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return _FIELD_DEFAULTS.get(dotted)
        node = node.get(part)
    if node is None:
        return _FIELD_DEFAULTS.get(dotted)
    return tuple(node) if isinstance(node, (list, tuple)) else node


def get_model(name: str, **overrides: Any) -> nn.Module:
    """The zoo model `name` with overrides: `get_model('ViT-B_16', num_classes=10)`.

    `num_classes` is required (0 or None for a model that returns features); the other
    overrides are those of `model_config`.
    """
    if "num_classes" not in overrides:
        raise ValueError(f"get_model({name!r}) needs num_classes= (0 or None for features).")
    check_num_classes(overrides["num_classes"])
    return model_class(name)(**model_config(name, **overrides))
