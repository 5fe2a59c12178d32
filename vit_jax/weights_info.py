"""What a params file's weights expect of their input, recorded beside it as `<file>.json`.

A released-format `.npz` holds the arrays only, and other readers of the format (the original
code, timm's npz loader) expect exactly the param keys, so nothing else can go inside it. Weights
trained in PyTorch on ImageNet mean/std-normalised pixels (DeiT, MAE) need the model's
`input_norm='imagenet'`; used with the original's [-1, 1] normalisation they give plausible but
wrong outputs, silently. So the timm converter (and a training run of such a model) writes
`{"input_norm": ..., ...}` beside the file, and everything that builds a model for a file
(fine-tuning's `pretrained`, `predict`, `attention`, distillation's teacher) calls
`check_input_norm`, which fails naming both normalisations and the fix. A file without the
record (the original's releases, plain ViT runs) is not checked.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vit_jax.checkpoint import CheckpointError
from vit_jax.models_vit import INPUT_NORMS

SUFFIX = ".json"
DEFAULT_INPUT_NORM = "inception"  # the original's x/127.5 − 1


def info_path(params_file: str | os.PathLike) -> str:
    return os.fspath(params_file) + SUFFIX


def write(params_file: str | os.PathLike, *, input_norm: str, **extra: Any) -> None:
    """Records `input_norm` (and e.g. the file's source) beside `params_file`."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(
            f"Unknown input_norm={input_norm!r}; valid values: {', '.join(INPUT_NORMS)}."
        )
    mean, std = INPUT_NORMS[input_norm]
    record = {"input_norm": input_norm, "mean": list(mean), "std": list(std), **extra}
    with open(info_path(params_file), "w") as f:
        json.dump(record, f, indent=1)


def read(params_file: str | os.PathLike) -> dict[str, Any] | None:
    """The record beside `params_file`, or None when there is none."""
    path = info_path(params_file)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_input_norm(params_file: str | os.PathLike, input_norm: str, used_by: str) -> None:
    """CheckpointError when `params_file`'s record names another normalisation than the
    model's `input_norm`; `used_by` names the model in the message (e.g. "model 'ViT-B_16'")."""
    record = read(params_file)
    if record is None or record.get("input_norm", input_norm) == input_norm:
        return
    recorded = record["input_norm"]
    raise CheckpointError(
        f"{os.fspath(params_file)!r} holds weights trained on input_norm={recorded!r} pixels "
        f"(recorded in {info_path(params_file)!r}), but {used_by} has input_norm="
        f"{input_norm!r}. Use the model with input_norm={recorded!r}: --config.model."
        f"input_norm={recorded} for training, or a zoo model made for these weights (e.g. "
        'DeiT-*), or --overrides=\'{"input_norm": "' + recorded + "\"}' for predict/attention."
    )
