"""Parameter-tree layouts of the released format: nesting, module numbering, scanned blocks.

The released `.npz` files are flat (`'/'`-joined paths), number modules the older way (one
counter across types inside an encoder block) and hold the encoder unrolled; a model built with
`scan=True` stacks its blocks. These pure functions convert between the layouts; `checkpoint`
reads and writes the files with them (and re-exports them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vit_jax.position_tables import CheckpointError

# Inside an encoder block, the released files number modules with one counter across types.
_BLOCK_TO_RELEASED = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
# The names `load` renumbers: Flax's automatic `<ClassName>_<n>` and the encoder's
# `encoderblock_<n>`, the only numbered names of the released files. Names a module gives itself
# (BEiT's `gamma_1`, `gamma_2`) are kept. The original's `convert_pre_linen` renumbers every
# `<name>_<n>` (`_ANY_NUMBERED`); `convert_pre_linen_pytree` keeps that behaviour.
_NUMBERED = re.compile(r"^([A-Z]\w*|encoderblock)_(\d+)$")
_ANY_NUMBERED = re.compile(r"^(.*)_(\d+)$")
_UNROLLED_BLOCK = re.compile(r"^encoderblock_(\d+)$")
SCANNED_BLOCK = "encoderblock"

Params = dict[str, Any]


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """{'a': {'b': x}} → {'a/b': x}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            for sub_key, sub_value in flatten(value, sep).items():
                flat[f"{key}{sep}{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> Params:
    """{'a/b': x} → {'a': {'b': x}}."""
    tree: Params = {}
    for key, value in flat.items():
        *parents, leaf = key.split(sep)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"Key {key!r} nests under an array in the checkpoint.")
        node[leaf] = value
    return tree


def from_released_numbering(tree: Mapping[str, Any], numbered: re.Pattern = _NUMBERED) -> Params:
    """Renumbers modules per type (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2`
    → `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1`) at every level of the tree.

    Within one parent, names `<type>_<n>` of the same type keep their order and are numbered
    0, 1, ... (Flax's automatic `<ClassName>_<n>` names and `encoderblock_<n>`; other names, such
    as BEiT's `gamma_1`, are not renumbered; `numbered` says which). A tree already in the
    current numbering comes back unchanged.
    """
    by_type: dict[str, list[tuple[int, str]]] = {}
    for key in tree:
        match = numbered.match(key)
        if match:
            by_type.setdefault(match.group(1), []).append((int(match.group(2)), key))
    renamed = {}
    for prefix, keys in by_type.items():
        for new_index, (_, key) in enumerate(sorted(keys)):
            renamed[key] = f"{prefix}_{new_index}"
    return {
        renamed.get(key, key): from_released_numbering(value, numbered)
        if isinstance(value, Mapping)
        else value
        for key, value in tree.items()
    }


# The original's name for the same renumbering (its checkpoint_test.py calls it).
def convert_pre_linen_pytree(tree: Mapping[str, Any]) -> Params:
    """The original's renumbering: every `<name>_<n>`, not only Flax's automatic names."""
    return from_released_numbering(tree, _ANY_NUMBERED)


def to_released_numbering(tree: Mapping[str, Any]) -> Params:
    """Current Linen names → the released files' names inside every `encoderblock_{i}`."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            if _UNROLLED_BLOCK.match(key):
                value = {_BLOCK_TO_RELEASED.get(k, k): v for k, v in value.items()}
            value = to_released_numbering(value)
        out[key] = value
    return out


def squeeze_groupnorm(tree: Mapping[str, Any]) -> Params:
    """GroupNorm scale/bias stored as (1, 1, 1, C) in older hybrid files → (C,)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            if key.startswith("gn"):
                value = {
                    k: v.reshape(v.shape[-1]) if _is_broadcast_vector(v) else v
                    for k, v in value.items()
                }
            value = squeeze_groupnorm(value)
        out[key] = value
    return out


def _is_broadcast_vector(v: Any) -> bool:
    shape = getattr(v, "shape", ())
    return len(shape) > 1 and all(d == 1 for d in shape[:-1])


def is_scanned(params: Mapping[str, Any]) -> bool:
    """True when the encoder blocks are stacked under `Transformer/encoderblock`."""
    transformer = params.get("Transformer", {})
    return isinstance(transformer, Mapping) and SCANNED_BLOCK in transformer


def scan_params(params: Mapping[str, Any]) -> Params:
    """Unrolled `Transformer/encoderblock_{i}` → one `Transformer/encoderblock` whose leaves
    carry a leading axis of length num_layers (the layout of a model built with `scan=True`)."""
    transformer = dict(params["Transformer"])
    indices = sorted(int(m.group(1)) for k in transformer if (m := _UNROLLED_BLOCK.match(k)))
    if not indices:
        raise CheckpointError("scan_params: no Transformer/encoderblock_{i} entries to stack.")
    if indices != list(range(len(indices))):
        raise CheckpointError(f"scan_params: encoder blocks are not numbered 0..n-1: {indices}.")
    blocks = [flatten(transformer.pop(f"encoderblock_{i}")) for i in indices]
    keys = set(blocks[0])
    for i, block in enumerate(blocks):
        if set(block) != keys:
            raise CheckpointError(
                f"scan_params: encoderblock_{i} has different params than encoderblock_0: "
                f"{sorted(keys ^ set(block))}."
            )
    transformer[SCANNED_BLOCK] = unflatten(
        {k: np.stack([np.asarray(b[k]) for b in blocks]) for k in sorted(keys)}
    )
    return {**params, "Transformer": transformer}


def unscan_params(params: Mapping[str, Any]) -> Params:
    """Inverse of `scan_params`: one `encoderblock_{i}` per slice of the stacked leaves."""
    transformer = dict(params["Transformer"])
    stacked = flatten(transformer.pop(SCANNED_BLOCK))
    lengths = {np.shape(v)[0] for v in stacked.values()}
    if len(lengths) != 1:
        raise CheckpointError(f"unscan_params: stacked leaves disagree on depth: {lengths}.")
    for i in range(lengths.pop()):
        transformer[f"encoderblock_{i}"] = unflatten({k: v[i] for k, v in stacked.items()})
    return {**params, "Transformer": transformer}
