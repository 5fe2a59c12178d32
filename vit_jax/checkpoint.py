"""The released checkpoint format (.npz) and the fine-tuning loader.

This module owns: reading and writing the released `.npz` layout (flat `np.savez` of arrays keyed
by '/'-joined paths, in the older module numbering), checking a parameter tree against the one a
model expects, and `load_pretrained`, which adapts a pretrained tree to a new model. It does not
own training checkpoints (optimizer state, resume: `vit_jax.resumable`) or the position table's
resampling (`vit_jax.position_tables`) or the tree layouts (numbering, scanned blocks:
`vit_jax.param_layouts`); it re-exports both modules' names.

Every function here is strict: a mismatch fails with the full list of what differs unless it is
one that fine-tuning changes on purpose (head, head_hidden, pre_logits, class token,
distillation token and its head, position table).
"""

from __future__ import annotations

import io
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax import encoder_tree, relative_positions
from vit_jax.param_layouts import (  # noqa: F401 (re-exported: the tree layouts)
    SCANNED_BLOCK,
    convert_pre_linen_pytree,
    flatten,
    from_released_numbering,
    is_scanned,
    scan_params,
    squeeze_groupnorm,
    to_released_numbering,
    unflatten,
    unscan_params,
)
from vit_jax.position_tables import (  # noqa: F401 (re-exported: position-table resampling)
    CheckpointError,
    interpolate_posembed,
    resample_grid,
    special_rows,
)

RELEASED_FILES_HINT = (
    "Released checkpoints are published in the public bucket gs://vit_models/ "
    "(https://console.cloud.google.com/storage/browser/vit_models), e.g. "
    "gs://vit_models/imagenet21k/ViT-B_16.npz or gs://vit_models/augreg/*.npz; download one with "
    "`gsutil cp` or `wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz`."
)
_GIT_LFS_MAGIC = b"version https://git-lfs"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


Params = dict[str, Any]
PARAMS_FILE = "params.npz"  # the final params a training workdir (or each phase of one) holds


# --------------------------------------------------------------------------- reading / writing


def check_exists(path: str | os.PathLike) -> None:
    """FileNotFoundError naming `path` and where the released files are, if it is missing."""
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"Checkpoint not found: {os.fspath(path)!r}. {RELEASED_FILES_HINT}")


def resolve_params_file(path: str | os.PathLike) -> str:
    """The `.npz` for `path`: the file itself, or the params file of a training workdir.

    Fine-tuning's `pretrained` and `predict --checkpoint` both resolve paths with it.

    A workdir holding `params.npz` gives that file. A multi-phase workdir (no `params.npz`,
    but `<phase>/params.npz` sub-directories) gives the phase whose params file was written
    last, i.e. the last phase that finished. A directory with neither is an error listing what
    it holds. A path that does not exist is returned unchanged, for `checkpoint.load` to report.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    own = os.path.join(path, PARAMS_FILE)
    if os.path.isfile(own):
        return own
    entries = sorted(os.listdir(path))
    phases = [e for e in entries if os.path.isfile(os.path.join(path, e, PARAMS_FILE))]
    if not phases:
        shown = ", ".join(entries[:20]) + (" ..." if len(entries) > 20 else "") or "nothing"
        raise FileNotFoundError(
            f"Checkpoint directory {path!r} has no {PARAMS_FILE} and no phase sub-directory "
            f"with one (it holds: {shown}). Pass a released-format .npz file, or the workdir of "
            "a finished training run."
        )
    latest = max(phases, key=lambda p: (os.path.getmtime(os.path.join(path, p, PARAMS_FILE)), p))
    return os.path.join(path, latest, PARAMS_FILE)


def load(path: str | os.PathLike) -> Params:
    """Reads a released-format `.npz` into a nested dict of NumPy arrays (current Linen names).

    Accepts the released files (older module numbering, hybrid GroupNorm params stored as
    (1, 1, 1, C)) and files already in the current numbering. Never unpickles anything.
    """
    path = epath.Path(path)
    check_exists(path)
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint path {os.fspath(path)!r} is a directory; expected a released-format .npz "
            "file."
        )
    flat = _read_npz(path)
    tree = unflatten(flat)
    return squeeze_groupnorm(from_released_numbering(tree))


def save(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes `params` as a released-format `.npz` that other readers of the format load.

    Encoder blocks are written unrolled and in the older numbering
    (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`), which the original code and
    timm's `_load_weights` expect;
    GroupNorm params are written as (C,), which every reader accepts. The file is written to a
    temporary name and renamed, so an existing file at `path` stays intact if writing fails.
    """
    path = epath.Path(path)
    params = unscan_params(params) if is_scanned(params) else params
    flat = flatten(to_released_numbering(params))
    arrays = {key: np.asarray(value) for key, value in flat.items()}
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
    name = os.fspath(path)
    data = path.read_bytes()
    head = data[:64]
    if not data:
        raise CheckpointError(f"Checkpoint {name!r} is an empty file, not an .npz archive.")
    if head.startswith(_GIT_LFS_MAGIC):
        raise CheckpointError(
            f"Checkpoint {name!r} is a Git LFS pointer ({len(data)} bytes of text), not the "
            "checkpoint itself. Fetch the real file with `git lfs pull`, or download it directly. "
            + RELEASED_FILES_HINT
        )
    if head.startswith(_NPY_MAGIC):
        raise CheckpointError(
            f"Checkpoint {name!r} is a single .npy array, not an .npz archive of named params."
        )
    if not head.startswith(_ZIP_MAGICS):
        raise CheckpointError(
            f"Checkpoint {name!r} is not an .npz archive (it starts with {head[:16]!r}). "
            "Expected a file written by numpy.savez, such as the released checkpoints."
        )
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint {name!r} is truncated or corrupt ({len(data)} bytes; {e}). Download it "
            "again."
        ) from None
    flat = {}
    with archive:
        for key in archive.files:
            try:
                flat[key] = archive[key]
            except ValueError as e:
                if "allow_pickle" in str(e) or "Object arrays" in str(e):
                    raise CheckpointError(
                        f"Checkpoint {name!r} holds Python objects in {key!r} (a pickled object "
                        "array). Refused: checkpoints are loaded with allow_pickle=False and "
                        "nothing is ever unpickled. Re-save the params as plain numeric arrays."
                    ) from None
                raise CheckpointError(
                    f"Checkpoint {name!r}: array {key!r} is corrupt: {e}"
                ) from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise CheckpointError(
                    f"Checkpoint {name!r} is truncated or corrupt: array {key!r} cannot be read "
                    f"({e}). Download it again."
                ) from None
    if not flat:
        raise CheckpointError(f"Checkpoint {name!r} is an .npz archive with no arrays in it.")
    return flat


# --------------------------------------------------------------------------- checking


def inspect_params(
    *,
    params: Mapping[str, Any],
    expected: Mapping[str, Any],
    fail_if_extra: bool = True,
    fail_if_missing: bool = True,
    fail_if_shape_mismatch: bool = True,
) -> Params:
    """Compares a parameter tree with the expected one (arrays or `jax.ShapeDtypeStruct`s).

    Raises one CheckpointError listing every missing key, extra key and wrong shape (key,
    expected, found), as far as the `fail_if_*` flags ask; the rest is logged. Returns `params`
    (the same arrays) with the empty sub-trees of `expected` it lacks added back, as the
    original does: `.npz` files cannot hold an empty dict, so a parameter-free module's entry
    is missing from every saved file.
    """
    got, want = flatten(params), flatten(expected)
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    mismatched = [
        (k, tuple(np.shape(want[k])), tuple(np.shape(got[k])))
        for k in sorted(want.keys() & got.keys())
        if tuple(np.shape(want[k])) != tuple(np.shape(got[k]))
    ]
    problems = []
    if missing and fail_if_missing:
        problems.append(_listing("Missing params from checkpoint", missing))
    if extra and fail_if_extra:
        problems.append(_listing("Extra params in checkpoint (the model has no such param)", extra))
    if mismatched and fail_if_shape_mismatch:
        lines = [f"{k}: model expects {w}, checkpoint has {g}" for k, w, g in mismatched]
        problems.append(_listing("Params with the wrong shape", lines))
    if problems:
        raise CheckpointError("Parameters do not match the model:\n" + "\n".join(problems))
    for label, items in (("missing", missing), ("extra", extra), ("mis-shaped", mismatched)):
        if items:
            logging.warning("inspect_params: %d %s keys allowed: %s", len(items), label, items)
    return _with_empty_subtrees(params, expected)


def _with_empty_subtrees(params: Mapping[str, Any], expected: Mapping[str, Any]) -> Params:
    """`params` (same leaves) plus every empty sub-tree of `expected` it does not have."""
    result = dict(params)
    for key, want in expected.items():
        if not isinstance(want, Mapping):
            continue
        got = result.get(key)
        if got is None and not flatten(want):  # a sub-tree of empty sub-trees only
            result[key] = _with_empty_subtrees({}, want)
        elif isinstance(got, Mapping):
            result[key] = _with_empty_subtrees(got, want)
    return result


def _listing(title: str, items: Iterable[str]) -> str:
    items = list(items)
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in items)


# --------------------------------------------------------------------------- fine-tuning


def load_pretrained(
    *,
    pretrained_path: str | os.PathLike,
    init_params: Mapping[str, Any],
    model_config: Mapping[str, Any] | None = None,
    old_grid_shape: tuple[int, int] | None = None,
    new_grid_shape: tuple[int, int] | None = None,
) -> Params:
    """Loads pretrained params for fine-tuning a model whose fresh params are `init_params`.

    Changes made on purpose (each logged): `head` and `head_hidden` (the optional hidden layer
    before it) come from `init_params` (new class count, fresh init), whether or not the file
    has them, and are dropped when the new model has none; `pre_logits` is dropped when the new
    model has no representation layer, or taken from `init_params` when only the new model has
    one; the class token follows the new model; the position table is resampled to the new
    length (see `interpolate_posembed`); Swin's and BEiT's relative position bias tables are
    resampled to the new window or grid (`relative_positions.resize_bias_table`). A distilled
    checkpoint (DeiT's `dist_token`) into a model without one loses `dist_token`, its position
    row and `head_dist`; a checkpoint without one into a distilled model gets a fresh
    `dist_token` and `head_dist` from `init_params` and a zero position row for it. Both are
    legitimate fine-tuning starts, and both are logged as warnings naming what was dropped or
    initialised. Anything else that differs (missing, extra or mis-shaped keys) fails with one
    error listing all of it. The pretrained file may be in either numbering and either encoder
    layout; the result has the layout of `init_params`.
    `model_config` is accepted for compatibility with the original signature and used only in
    messages; the new model's structure is read from `init_params`.
    """
    restored = load(pretrained_path)
    restored = adapt_for_finetuning(
        restored,
        init_params,
        old_grid_shape=old_grid_shape,
        new_grid_shape=new_grid_shape,
    )
    name = (model_config or {}).get("model_name") or "the model"
    logging.info("load_pretrained: %s loaded for %s", os.fspath(pretrained_path), name)
    return restored


# The head's layers, which fine-tuning always re-initialises (a new task's outputs); `head_dist*`
# are a distilled model's second head.
FRESH_HEAD_KEYS = ("head", "head_hidden", "head_dist", "head_dist_hidden")


def adapt_for_finetuning(
    restored: Mapping[str, Any],
    init_params: Mapping[str, Any],
    *,
    old_grid_shape: tuple[int, int] | None = None,
    new_grid_shape: tuple[int, int] | None = None,
) -> Params:
    """The tree changes of `load_pretrained`, on an already loaded tree."""
    init_params = _as_plain_dict(init_params)
    target_scanned = is_scanned(init_params)
    expected = unscan_params(init_params) if target_scanned else init_params
    if encoder_tree.is_pretraining_tree(init_params):
        return _adapt_for_pretraining(restored, init_params, old_grid_shape, new_grid_shape)
    params, left_out = encoder_tree.encoder_params(_as_plain_dict(restored))
    if left_out:
        logging.warning(
            "load_pretrained: a self-supervised pretraining file: its encoder is loaded; "
            "dropped: %s",
            "; ".join(left_out),
        )
    params = unscan_params(params) if is_scanned(params) else params

    for key in FRESH_HEAD_KEYS:
        if key in expected:
            had = "replaces the checkpoint's" if key in params else "not in the checkpoint"
            logging.info("load_pretrained: %s from init_params (fresh init; %s)", key, had)
            params[key] = expected[key]
        elif key in params:
            logging.info("load_pretrained: %s dropped (the new model has none)", key)
            del params[key]
    for key in ("pre_logits", "cls"):
        if key in expected and key not in params:
            logging.info("load_pretrained: %s not in the checkpoint, fresh init kept", key)
            params[key] = expected[key]
        elif key not in expected and key in params:
            logging.info("load_pretrained: %s dropped (the new model has none)", key)
            del params[key]
    if "dist_token" in params and "dist_token" not in expected:
        logging.warning(
            "load_pretrained: the checkpoint is distilled but the model is not: dist_token, its "
            "position row and head_dist are dropped (fine-tuning as a plain classifier)"
        )
        del params["dist_token"]
    elif "dist_token" in expected and "dist_token" not in params:
        logging.warning(
            "load_pretrained: the model is distilled but the checkpoint is not: dist_token and "
            "head_dist are freshly initialised, the distillation position row is zero"
        )
        params["dist_token"] = expected["dist_token"]

    posemb_path = ("Transformer", "posembed_input", "pos_embedding")
    old = _get_path(params, posemb_path)
    new = _get_path(expected, posemb_path)
    if old is not None and new is not None and np.shape(old) != np.shape(new):
        resampled = interpolate_posembed(
            old,
            np.shape(new)[1],
            has_class_token=special_rows(restored),
            new_has_class_token=special_rows(expected),
            old_grid_shape=old_grid_shape,
            new_grid_shape=new_grid_shape,
        )
        logging.info(
            "load_pretrained: position table resampled %s → %s", np.shape(old), resampled.shape
        )
        params["Transformer"]["posembed_input"]["pos_embedding"] = resampled

    params, resized = relative_positions.resize_relative_tables(params, expected)
    if resized:
        logging.info(
            "load_pretrained: %d relative position tables resampled (Swin / BEiT, a new "
            "window or grid), e.g. %s",
            len(resized),
            resized[0],
        )
    check_mixer_tokens(params, expected)
    params = inspect_params(params=params, expected=expected)
    return scan_params(params) if target_scanned else params


_MIXER_TOKEN_KERNEL = ("MixerBlock_0", "token_mixing", "Dense_0", "kernel")


def _adapt_for_pretraining(
    restored: Mapping[str, Any],
    init_params: Mapping[str, Any],
    old_grid_shape: tuple[int, int] | None,
    new_grid_shape: tuple[int, int] | None,
) -> Params:
    """A pretraining model (`vit_jax.encoder_tree`) started from a file: the file's encoder
    (a released ViT or another pretraining run's) adapted as for fine-tuning; the objective's
    parts from the file where it has them with the same shapes, else freshly initialised."""
    init_params = _as_plain_dict(init_params)
    restored = _as_plain_dict(restored)
    encoder, _ = encoder_tree.encoder_params(restored)
    params = dict(init_params)
    params[encoder_tree.ENCODER] = adapt_for_finetuning(
        encoder,
        init_params[encoder_tree.ENCODER],
        old_grid_shape=old_grid_shape,
        new_grid_shape=new_grid_shape,
    )
    for key in set(init_params) - {encoder_tree.ENCODER}:
        if key in restored and _shapes(restored[key]) == _shapes(init_params[key]):
            params[key] = restored[key]
        else:
            logging.info("load_pretrained: %s fresh init (not in the file with these shapes)", key)
    dropped = sorted(set(restored) - set(init_params) - {encoder_tree.ENCODER})
    if encoder_tree.is_pretraining_tree(restored) and dropped:
        logging.warning(
            "load_pretrained: the file's %s are not parts of this objective: dropped", dropped
        )
    return params


def _shapes(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: np.shape(v) for k, v in flatten(tree).items()}
    return np.shape(tree)


def check_mixer_tokens(restored: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """CheckpointError naming the resolution a Mixer checkpoint needs, if its token count differs.

    A Mixer's token-mixing weights are sized by the number of patches, so unlike a ViT's
    position table they cannot be resampled: the model must see the checkpoint's grid.
    """
    old, new = _get_path(restored, _MIXER_TOKEN_KERNEL), _get_path(expected, _MIXER_TOKEN_KERNEL)
    if old is None or new is None or np.shape(old)[0] == np.shape(new)[0]:
        return
    tokens, model_tokens = np.shape(old)[0], np.shape(new)[0]
    stem = _get_path(restored, ("stem", "kernel"))
    patch = np.shape(stem)[0] if stem is not None else None
    side = math.isqrt(tokens)
    if patch and side * side == tokens:
        size = side * patch
        needed = (
            f"it was trained at {size} px ({side}×{side} patches of {patch} px): fine-tune at "
            f"image_size={size} (--config.image_size={size})"
        )
    else:
        needed = f"use an image size that gives {tokens} patches"
    raise CheckpointError(
        f"The Mixer checkpoint has {tokens} tokens, the model at this image size has "
        f"{model_tokens}. Mixer's token-mixing weights are sized by the number of patches and "
        f"cannot be resampled like a ViT's position table; {needed}."
    )


def _as_plain_dict(tree: Mapping[str, Any]) -> Params:
    return {k: _as_plain_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
