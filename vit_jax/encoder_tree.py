"""The trees of self-supervised pretraining runs: a ViT `encoder` beside the objective's parts.

A pretraining run (`task='mae'` or `'mpp'`, `vit_jax.models_ssl`) saves its params as
`{'encoder': <the released ViT tree, no head>, <its objective's parts>}`. Fine-tuning needs the
encoder alone, and must say what it leaves out; `encoder.npz` beside the run's `params.npz` is
that encoder in the released layout, for timm, the original and any other reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ENCODER = "encoder"
ENCODER_FILE = "encoder.npz"  # beside a pretraining run's params.npz: the encoder alone
# The top-level entries of a pretraining tree besides `encoder`: its objective's own parts.
PRETRAINING_PARTS = {
    "decoder": "MAE decoder",
    "mask_token": "masked patch prediction's [mask] embedding",
    "mpp_head": "masked patch prediction head",
}


def is_pretraining_tree(params: Mapping[str, Any]) -> bool:
    """Whether `params` is a pretraining run's tree (an `encoder` beside pretraining parts)."""
    return ENCODER in params and set(params) - {ENCODER} <= set(PRETRAINING_PARTS)


def encoder_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the ViT encoder tree, a description of each part left out) of a pretraining tree.

    Any other tree is returned as it is, with nothing left out.
    """
    if not is_pretraining_tree(params):
        return dict(params), []
    left = [
        f"{key} ({PRETRAINING_PARTS[key]}, {_size(value):,} params)"
        for key, value in params.items()
        if key != ENCODER
    ]
    return dict(params[ENCODER]), left


def _size(tree: Any) -> int:
    if isinstance(tree, Mapping):
        return sum(_size(v) for v in tree.values())
    return int(np.size(tree))
