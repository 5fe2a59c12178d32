"""Tests for vit_jax.checkpoint: the released .npz format, resampling and load_pretrained."""

import errno
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from tests import _compiled
from vit_jax import checkpoint, models
from vit_jax.models_mixer import MlpMixer
from vit_jax.models_vit import VisionTransformer


def _tiny_vit(num_classes=10, classifier="token", representation_size=None, layers=2, **kw):
    return VisionTransformer(
        num_classes=num_classes,
        patches={"size": (8, 8)},
        transformer={
            "num_layers": layers,
            "mlp_dim": 24,
            "num_heads": 2,
            "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
        },
        hidden_size=16,
        classifier=classifier,
        representation_size=representation_size,
        **kw,
    )


def _tiny_hybrid():
    return VisionTransformer(
        num_classes=3,
        patches={"size": (1, 1)},
        transformer={"num_layers": 1, "mlp_dim": 16, "num_heads": 2, "dropout_rate": 0.0},
        hidden_size=8,
        resnet={"num_layers": (1,), "width_factor": 0.5},
    )


def _tiny_mixer():
    return MlpMixer(
        patches={"size": (8, 8)},
        num_classes=4,
        num_blocks=2,
        hidden_dim=8,
        tokens_mlp_dim=6,
        channels_mlp_dim=12,
    )


def _init(model, size=32, seed=0):
    x = jnp.zeros((1, size, size, 3))
    # Only the shapes are kept: traced, not compiled or run (an eager init compiles every op).
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), x, train=False))["params"]
    # Re-draw every leaf so that no param is trivially zero (heads are zero-initialised).
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(size=leaf.shape).astype(np.float32) for leaf in leaves]
    return jax.tree.unflatten(treedef, leaves)


def _initial_params(model, size):
    """The model's own initial params for a (1, size, size, 3) input."""
    return _compiled.init_params(model, jnp.zeros((1, size, size, 3)), seed=1)


def _assert_trees_equal(a, b):
    fa, fb = checkpoint.flatten(a), checkpoint.flatten(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)
        assert np.asarray(fa[key]).dtype == np.asarray(fb[key]).dtype, key


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(("old", "new"), [(14, 24), (7, 12), (1, 2), (24, 14)])
@pytest.mark.parametrize("has_class_token", [True, False])
def test_interpolate_posembed_matches_scipy_zoom(old, new, has_class_token):
    rng = np.random.default_rng(old * 100 + new)
    dim = 6
    posemb = rng.normal(size=(1, int(has_class_token) + old * old, dim)).astype(np.float32)
    out = checkpoint.interpolate_posembed(posemb, int(has_class_token) + new * new, has_class_token)
    assert out.shape == (1, int(has_class_token) + new * new, dim)
    assert out.dtype == np.float32
    grid = posemb[0, int(has_class_token) :].reshape(old, old, dim)
    expected = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(1, -1, dim)
    np.testing.assert_allclose(out[:, int(has_class_token) :], expected, atol=1e-6, rtol=0)
    if has_class_token:
        np.testing.assert_array_equal(out[:, :1], posemb[:, :1])


def test_resample_grid_aligns_corners_by_hand():
    # A 2-point ramp resampled to 3 points: corners kept, the middle is the average.
    grid = np.array([[[0.0], [4.0]], [[8.0], [12.0]]], np.float32)
    out = checkpoint.resample_grid(grid, (3, 3))
    np.testing.assert_allclose(out[..., 0], [[0, 2, 4], [4, 6, 8], [8, 10, 12]])


def test_interpolate_posembed_non_square_grid():
    rng = np.random.default_rng(1)
    posemb = rng.normal(size=(1, 1 + 3 * 5, 4)).astype(np.float32)
    out = checkpoint.interpolate_posembed(
        posemb, 1 + 6 * 8, True, old_grid_shape=(3, 5), new_grid_shape=(6, 8)
    )
    expected = scipy.ndimage.zoom(posemb[0, 1:].reshape(3, 5, 4), (6 / 3, 8 / 5, 1), order=1)
    np.testing.assert_allclose(out[0, 1:], expected.reshape(48, 4), atol=1e-6)
    np.testing.assert_array_equal(out[:, 0], posemb[:, 0])


def test_interpolate_posembed_non_square_without_shape_is_a_clear_error():
    posemb = np.zeros((1, 1 + 3 * 5, 4), np.float32)
    with pytest.raises(checkpoint.CheckpointError, match=r"15 grid rows.*not a square.*grid_shape"):
        checkpoint.interpolate_posembed(posemb, 1 + 16, True)
    with pytest.raises(checkpoint.CheckpointError, match=r"\(4, 4\) has 16 cells.*15 grid rows"):
        checkpoint.interpolate_posembed(posemb, 17, True, old_grid_shape=(4, 4))


def test_interpolate_posembed_converts_between_token_and_gap_tables():
    rng = np.random.default_rng(2)
    with_cls = rng.normal(size=(1, 1 + 4, 3)).astype(np.float32)
    # token → gap at the same grid: the class row is dropped, the grid kept exactly.
    gap = checkpoint.interpolate_posembed(with_cls, 4, True, new_has_class_token=False)
    np.testing.assert_array_equal(gap, with_cls[:, 1:])
    # gap → token, resized 2x2 → 3x3: a zero class row in front of the resized grid.
    token = checkpoint.interpolate_posembed(gap, 1 + 9, False, new_has_class_token=True)
    np.testing.assert_array_equal(token[:, 0], np.zeros((1, 3)))
    expected = scipy.ndimage.zoom(gap[0].reshape(2, 2, 3), (1.5, 1.5, 1), order=1)
    np.testing.assert_allclose(token[0, 1:], expected.reshape(9, 3), atol=1e-6)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("make_model", [_tiny_vit, _tiny_hybrid, _tiny_mixer])
def test_save_load_round_trip_is_bit_identical(tmp_path, make_model):
    params = _init(make_model())
    path = tmp_path / "params.npz"
    checkpoint.save(params, path)
    _assert_trees_equal(checkpoint.load(path), params)
    # Nothing but the file itself is left in the folder (no temporary files).
    assert os.listdir(tmp_path) == ["params.npz"]
    # No entry is pickled: numpy's own reader, pickles refused, reads every one as float32.
    with np.load(path, allow_pickle=False) as npz:
        dtypes = {key: npz[key].dtype for key in npz.files}
    assert len(dtypes) == len(jax.tree.leaves(params))
    assert set(dtypes.values()) == {np.dtype(np.float32)}


def test_save_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "params.npz"
    checkpoint.save(_init(_tiny_vit(), seed=0), path)
    newer = _init(_tiny_vit(), seed=1)
    checkpoint.save(newer, path)
    _assert_trees_equal(checkpoint.load(path), newer)


def test_saved_file_uses_the_released_numbering(tmp_path):
    params = _init(_tiny_vit(layers=12))
    path = tmp_path / "vit.npz"
    checkpoint.save(params, path)
    keys = set(np.load(path, allow_pickle=False).files)
    block = "Transformer/encoderblock_11/"
    for name in (
        "LayerNorm_0/scale",
        "MultiHeadDotProductAttention_1/query/kernel",
        "MultiHeadDotProductAttention_1/out/bias",
        "LayerNorm_2/bias",
        "MlpBlock_3/Dense_0/kernel",
        "MlpBlock_3/Dense_1/bias",
    ):
        assert block + name in keys
    assert not any("MultiHeadDotProductAttention_0" in k or "LayerNorm_1" in k for k in keys)
    assert {"cls", "embedding/kernel", "Transformer/posembed_input/pos_embedding"} <= keys
    # Released readers index blocks by number: block 10 holds block 10's params.
    np.testing.assert_array_equal(
        np.load(path)["Transformer/encoderblock_10/MlpBlock_3/Dense_1/kernel"],
        params["Transformer"]["encoderblock_10"]["MlpBlock_0"]["Dense_1"]["kernel"],
    )


def test_file_in_current_numbering_loads_to_the_same_tree(tmp_path):
    params = _init(_tiny_vit(layers=3))
    released, current = tmp_path / "released.npz", tmp_path / "current.npz"
    checkpoint.save(params, released)
    np.savez(current, **{k: np.asarray(v) for k, v in checkpoint.flatten(params).items()})
    assert "Transformer/encoderblock_0/LayerNorm_1/scale" in np.load(current).files
    _assert_trees_equal(checkpoint.load(current), checkpoint.load(released))
    _assert_trees_equal(checkpoint.load(current), params)


def test_hybrid_groupnorm_stored_as_1_1_1_c_is_squeezed(tmp_path):
    params = _init(_tiny_hybrid())
    flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
    gn_keys = [k for k in flat if "/gn" in f"/{k}" and k.rsplit("/", 1)[1] in ("scale", "bias")]
    assert "gn_root/scale" in gn_keys and "block1/unit1/gn_proj/bias" in gn_keys
    old_style = {k: v.reshape(1, 1, 1, -1) if k in gn_keys else v for k, v in flat.items()}
    path = tmp_path / "hybrid_old.npz"
    np.savez(path, **old_style)
    loaded = checkpoint.load(path)
    assert loaded["gn_root"]["scale"].shape == (32,)
    _assert_trees_equal(loaded, params)
    # The loaded params run in the model and give the original params' outputs.
    model = _tiny_hybrid()
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    apply = jax.jit(lambda p: model.apply({"params": p}, x, train=False))  # one compile
    np.testing.assert_array_equal(apply(loaded), apply(params))


def test_from_released_numbering_sorts_numerically():
    tree = {f"encoderblock_{i}": {"x": np.array(i)} for i in (0, 2, 10, 1)}
    tree["Dense_3"] = {"w": np.array(1)}
    tree["LayerNorm_1"] = {"w": np.array(2)}
    out = checkpoint.from_released_numbering(tree)
    assert {k: int(v["x"]) for k, v in out.items() if k.startswith("enc")} == {
        "encoderblock_0": 0,
        "encoderblock_1": 1,
        "encoderblock_2": 2,
        "encoderblock_3": 10,
    }
    assert int(out["Dense_0"]["w"]) == 1 and int(out["LayerNorm_0"]["w"]) == 2


def test_names_a_module_gives_itself_keep_their_numbers(tmp_path):
    """BEiT's LayerScale `gamma_1`, `gamma_2` are not Flax's automatic names: a saved BEiT file
    loads with them as they were (renumbered, they became gamma_0, gamma_1 and failed to load)."""
    block = {"gamma_1": np.ones(4), "gamma_2": np.full(4, 2.0), "norm1": {"scale": np.ones(4)}}
    params = {"blocks_0": block, "blocks_1": block, "head": {"kernel": np.zeros((4, 2))}}
    checkpoint.save(params, tmp_path / "beit.npz")
    loaded = checkpoint.load(tmp_path / "beit.npz")
    assert sorted(loaded["blocks_1"]) == ["gamma_1", "gamma_2", "norm1"]
    np.testing.assert_array_equal(loaded["blocks_1"]["gamma_2"], 2.0)


def test_scan_unscan_round_trip_and_save_from_scanned(tmp_path):
    params = _init(_tiny_vit(layers=3))
    scanned = checkpoint.scan_params(params)
    assert checkpoint.is_scanned(scanned) and not checkpoint.is_scanned(params)
    kernel = scanned["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.shape == (3, 16, 24)
    # The stacked layout is the one a scan=True model initialises.
    scan_model = _tiny_vit(layers=3, scan=True)
    expected = jax.eval_shape(
        lambda: scan_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )["params"]
    checkpoint.inspect_params(params=scanned, expected=expected)
    _assert_trees_equal(checkpoint.unscan_params(scanned), params)
    path = tmp_path / "scanned.npz"
    checkpoint.save(scanned, path)
    assert "Transformer/encoderblock_2/MlpBlock_3/Dense_0/kernel" in np.load(path).files
    _assert_trees_equal(checkpoint.load(path), params)


# --------------------------------------------------------------------------- bad files


def test_missing_file_says_where_released_files_are(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_such\.npz.*gs://vit_models"):
        checkpoint.load(tmp_path / "no_such.npz")


def test_not_an_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not weights\n")
    with pytest.raises(checkpoint.CheckpointError, match=r"notes\.npz.*not an \.npz archive"):
        checkpoint.load(path)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="empty file"):
        checkpoint.load(empty)
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(checkpoint.CheckpointError, match=r"single \.npy array"):
        checkpoint.load(npy)
    with pytest.raises(checkpoint.CheckpointError, match="is a directory"):
        checkpoint.load(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "full.npz"
    checkpoint.save(_init(_tiny_vit()), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        truncated = tmp_path / f"cut{cut}.npz"
        truncated.write_bytes(data[:cut])
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
            checkpoint.load(truncated)


def test_git_lfs_pointer_is_a_clear_error(tmp_path):
    path = tmp_path / "ViT-B_16.npz"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a2f0b3c5e8f1a9b6c7d0e2f4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f0a\n"
        "size 346326306\n"
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"Git LFS pointer.*git lfs pull"):
        checkpoint.load(path)


class _Boom:
    """Unpickling this object would create a file: proof that something was unpickled."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_object_arrays_are_refused_and_never_unpickled(tmp_path):
    sentinel = tmp_path / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = _Boom(str(sentinel))
    path = tmp_path / "pickles.npz"
    np.savez(path, **{"embedding/kernel": np.zeros(2), "head/kernel": payload})
    # The file really holds a pickle: an object-dtype .npy whose data is a pickle stream.
    with zipfile.ZipFile(path) as z, z.open("head/kernel.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        assert (shape, dtype) == ((1,), np.dtype(object))
        assert f.read(1) == pickle.PROTO  # a pickle stream starts with the PROTO opcode
    with np.load(path) as npz, pytest.raises(ValueError, match="allow_pickle=False"):
        npz["head/kernel"]  # and numpy refuses it too, without unpickling
    assert not sentinel.exists()
    with pytest.raises(checkpoint.CheckpointError, match=r"head/kernel.*Refused.*allow_pickle"):
        checkpoint.load(path)
    assert not sentinel.exists()


def test_save_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "params.npz"
    params = _init(_tiny_vit())
    checkpoint.save(params, path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(_init(_tiny_vit(), seed=1), path)
    _assert_trees_equal(checkpoint.load(path), params)
    assert os.listdir(tmp_path) == ["params.npz"]


# --------------------------------------------------------------------------- inspect_params


def test_inspect_params_lists_every_mismatch_in_one_error():
    expected = {"a": {"w": np.zeros((2, 3)), "b": np.zeros(3)}, "c": np.zeros(1)}
    params = {"a": {"w": np.zeros((3, 3)), "b": np.zeros(3)}, "d": np.zeros(1)}
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.inspect_params(params=params, expected=expected)
    message = str(info.value)
    assert "Missing params from checkpoint (1):\n    c" in message  # the original's words
    assert "Extra params in checkpoint (the model has no such param) (1):\n    d" in message
    assert "a/w: model expects (2, 3), checkpoint has (3, 3)" in message
    # Allowed differences pass and return the params unchanged.
    out = checkpoint.inspect_params(
        params=params,
        expected=expected,
        fail_if_extra=False,
        fail_if_missing=False,
        fail_if_shape_mismatch=False,
    )
    assert jax.tree.structure(out) == jax.tree.structure(params)
    leaves = zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True)
    assert all(a is b for a, b in leaves)  # the same arrays, not copies


def test_inspect_params_checks_real_params_against_shape_structs():
    """`expected` from jax.eval_shape (no arrays): matching params pass, wrong shapes fail."""
    model = models.get_model("testing", num_classes=10)  # hidden 10, 16 px patches
    x = jnp.zeros((1, 32, 32, 3))
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))["params"]
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(expected))
    params = _init(model)
    _assert_trees_equal(checkpoint.inspect_params(params=params, expected=expected), params)

    flat = checkpoint.flatten(params)
    flat["head/kernel"] = np.zeros((10, 7), np.float32)  # a 7-class head
    flat["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 17, 10), np.float32)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.inspect_params(params=checkpoint.unflatten(flat), expected=expected)
    message = str(info.value)
    assert "Params with the wrong shape (2)" in message
    assert "head/kernel: model expects (10, 10), checkpoint has (10, 7)" in message
    assert (
        "Transformer/posembed_input/pos_embedding: model expects (1, 5, 10), "
        "checkpoint has (1, 17, 10)" in message
    )
    assert "missing" not in message.lower() and "extra" not in message.lower()


# --------------------------------------------------------------------------- load_pretrained


def _pretrained_file(tmp_path, **kw):
    model = _tiny_vit(num_classes=21, representation_size=16, **kw)
    params = _init(model)
    path = tmp_path / "pretrained.npz"
    checkpoint.save(params, path)
    return path, params


def test_load_pretrained_for_finetuning_at_higher_resolution(tmp_path):
    path, pretrained = _pretrained_file(tmp_path)
    model = _tiny_vit(num_classes=5)  # no representation layer, new head
    init = _initial_params(model, 64)
    params = checkpoint.load_pretrained(
        pretrained_path=path, init_params=init, model_config={"representation_size": None}
    )
    assert "pre_logits" not in params
    _assert_trees_equal(params["head"], init["head"])
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert posemb.shape == (1, 1 + 8 * 8, 16)
    old = pretrained["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(posemb, checkpoint.interpolate_posembed(old, 65, True))
    # Everything else is the pretrained params, untouched.
    for key in ("cls", "embedding", "Transformer/encoderblock_1", "Transformer/encoder_norm"):
        node_a, node_b = params, pretrained
        for part in key.split("/"):
            node_a, node_b = node_a[part], node_b[part]
        _assert_trees_equal({"x": node_a}, {"x": node_b})
    logits = _compiled.apply(model, params, jnp.zeros((2, 64, 64, 3)))
    assert logits.shape == (2, 5)


def test_load_pretrained_keeps_pre_logits_when_the_new_model_has_them(tmp_path):
    path, pretrained = _pretrained_file(tmp_path)
    model = _tiny_vit(num_classes=5, representation_size=16)
    init = _initial_params(model, 32)
    params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    _assert_trees_equal(params["pre_logits"], pretrained["pre_logits"])
    _assert_trees_equal(
        params["Transformer"]["posembed_input"], pretrained["Transformer"]["posembed_input"]
    )


def test_load_pretrained_token_to_gap_and_into_a_scanned_model(tmp_path):
    path, pretrained = _pretrained_file(tmp_path)
    model = _tiny_vit(num_classes=5, classifier="gap", scan=True)
    init = _initial_params(model, 48)
    params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    assert "cls" not in params and checkpoint.is_scanned(params)
    old = pretrained["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(
        params["Transformer"]["posembed_input"]["pos_embedding"],
        checkpoint.interpolate_posembed(old, 36, True, new_has_class_token=False),
    )
    stacked = params["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"]
    np.testing.assert_array_equal(
        stacked[1], pretrained["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"]
    )
    assert _compiled.apply(model, params, jnp.zeros((1, 48, 48, 3))).shape == (1, 5)


def test_load_pretrained_reports_every_real_mismatch(tmp_path):
    path, _ = _pretrained_file(tmp_path)
    model = VisionTransformer(
        num_classes=5,
        patches={"size": (8, 8)},
        transformer={"num_layers": 3, "mlp_dim": 32, "num_heads": 2},
        hidden_size=16,
    )
    init = _initial_params(model, 32)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    message = str(info.value)
    assert "Missing params from checkpoint" in message
    assert "Transformer/encoderblock_2/LayerNorm_0/scale" in message
    assert (
        "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: model expects (16, 32), "
        "checkpoint has (16, 24)" in message
    )
    assert "head" not in message and "pre_logits" not in message


def _head_hidden_model(num_classes=1, head_hidden_size=4):
    return _tiny_vit(
        num_classes=num_classes, representation_size=16, head_hidden_size=head_hidden_size
    )


def test_load_pretrained_gives_head_hidden_a_fresh_init(tmp_path, caplog):
    # A file without head_hidden (as every released one) loads into a model with it.
    path, pretrained = _pretrained_file(tmp_path)
    model = _head_hidden_model()
    init = _initial_params(model, 32)
    with caplog.at_level("INFO"):
        params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    assert "head_hidden from init_params (fresh init; not in the checkpoint)" in caplog.text
    _assert_trees_equal(params["head_hidden"], init["head_hidden"])
    _assert_trees_equal(params["head"], init["head"])
    _assert_trees_equal(params["pre_logits"], pretrained["pre_logits"])
    _assert_trees_equal(params["Transformer"], pretrained["Transformer"])
    assert _compiled.apply(model, params, jnp.zeros((2, 32, 32, 3))).shape == (2, 1)


def test_load_pretrained_replaces_or_drops_a_checkpoints_head_hidden(tmp_path, caplog):
    trained = _init(_head_hidden_model(num_classes=3, head_hidden_size=4))
    path = tmp_path / "with_head_hidden.npz"
    checkpoint.save(trained, path)
    # Into a model with a head_hidden of another width: the fresh one, whatever the file has.
    model = _head_hidden_model(num_classes=1, head_hidden_size=8)
    init = _initial_params(model, 32)
    with caplog.at_level("INFO"):
        params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    assert "head_hidden from init_params (fresh init; replaces the checkpoint's)" in caplog.text
    _assert_trees_equal(params["head_hidden"], init["head_hidden"])
    _assert_trees_equal(params["pre_logits"], trained["pre_logits"])
    # Into a model without one: dropped, and logged.
    plain = _tiny_vit(num_classes=2, representation_size=16)
    init = _initial_params(plain, 32)
    caplog.clear()
    with caplog.at_level("INFO"):
        params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    assert "head_hidden dropped (the new model has none)" in caplog.text
    assert set(params) == set(init)
    _assert_trees_equal(params["head"], init["head"])


# --------------------------------------------------------------------------- distillation token


def test_interpolate_posembed_keeps_two_special_rows_of_a_distilled_table():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(1, 2 + 4, 3)).astype(np.float32)  # cls, dist, 2×2 grid
    resized = checkpoint.interpolate_posembed(table, 2 + 9, 2)
    np.testing.assert_array_equal(resized[:, :2], table[:, :2])  # both special rows kept
    expected = scipy.ndimage.zoom(table[0, 2:].reshape(2, 2, 3), (1.5, 1.5, 1), order=1)
    np.testing.assert_allclose(resized[0, 2:], expected.reshape(9, 3), atol=1e-6)
    # Treating the distillation row as a grid row (the 1-row handling) would fail: 5 is no grid.
    with pytest.raises(checkpoint.CheckpointError, match="5 grid rows"):
        checkpoint.interpolate_posembed(table, 1 + 9, True)
    # distilled → plain: the class row stays, the distillation row goes, the grid is exact.
    plain = checkpoint.interpolate_posembed(table, 1 + 4, 2, new_has_class_token=1)
    np.testing.assert_array_equal(plain, table[:, [0, 2, 3, 4, 5]])
    # plain → distilled: the class row stays and a zero distillation row follows it.
    back = checkpoint.interpolate_posembed(plain, 2 + 4, 1, new_has_class_token=2)
    np.testing.assert_array_equal(back[:, 1], np.zeros((1, 3)))
    np.testing.assert_array_equal(back[:, [0, 2, 3, 4, 5]], plain)
    with pytest.raises(checkpoint.CheckpointError, match="0, 1 or 2 special rows, not 3"):
        checkpoint.interpolate_posembed(table, 3 + 4, 3)


def _distilled_file(tmp_path):
    params = _init(_tiny_vit(num_classes=21, distilled=True))
    path = tmp_path / "distilled.npz"
    checkpoint.save(params, path)
    return path, params


def _posemb(params):
    return np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])


def test_load_pretrained_distilled_into_distilled_at_higher_resolution(tmp_path):
    path, pretrained = _distilled_file(tmp_path)
    assert set(checkpoint.load(path)) >= {"cls", "dist_token", "head_dist"}  # saved and read
    model = _tiny_vit(num_classes=5, distilled=True)
    init = _initial_params(model, 64)
    params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    old = _posemb(pretrained)
    assert old.shape == (1, 2 + 4 * 4, 16) and _posemb(params).shape == (1, 2 + 8 * 8, 16)
    np.testing.assert_array_equal(_posemb(params), checkpoint.interpolate_posembed(old, 66, 2))
    np.testing.assert_array_equal(_posemb(params)[:, :2], old[:, :2])
    _assert_trees_equal({"x": params["dist_token"]}, {"x": pretrained["dist_token"]})
    _assert_trees_equal(params["head_dist"], init["head_dist"])  # a new task's head: fresh
    _assert_trees_equal(params["head"], init["head"])
    train_apply = jax.jit(
        lambda p: model.apply({"params": p}, jnp.zeros((2, 64, 64, 3)), train=True)
    )
    cls_logits, dist_logits = train_apply(params)
    assert cls_logits.shape == dist_logits.shape == (2, 5)


def test_load_pretrained_distilled_into_plain_drops_the_token_and_says_so(tmp_path, caplog):
    path, pretrained = _distilled_file(tmp_path)
    model = _tiny_vit(num_classes=5)
    init = _initial_params(model, 32)
    with caplog.at_level("WARNING"):
        params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    assert "checkpoint is distilled but the model is not" in caplog.text
    assert "dist_token" in caplog.text and "head_dist" in caplog.text
    assert set(params) == set(init)  # no dist_token, no head_dist
    old = _posemb(pretrained)
    np.testing.assert_array_equal(_posemb(params), old[:, [0, *range(2, 2 + 16)]])
    _assert_trees_equal({"x": params["cls"]}, {"x": pretrained["cls"]})
    assert _compiled.apply(model, params, jnp.zeros((2, 32, 32, 3))).shape == (2, 5)


def test_load_pretrained_plain_into_distilled_inits_the_token_and_says_so(tmp_path, caplog):
    path, pretrained = _pretrained_file(tmp_path)  # a plain ViT with pre_logits
    model = _tiny_vit(num_classes=5, representation_size=16, distilled=True)
    init = _initial_params(model, 32)
    with caplog.at_level("WARNING"):
        params = checkpoint.load_pretrained(pretrained_path=path, init_params=init)
    assert "model is distilled but the checkpoint is not" in caplog.text
    _assert_trees_equal({"x": params["dist_token"]}, {"x": init["dist_token"]})
    _assert_trees_equal(params["head_dist"], init["head_dist"])
    old, new = _posemb(pretrained), _posemb(params)
    assert new.shape == (1, 2 + 16, 16)
    np.testing.assert_array_equal(new[:, 0], old[:, 0])
    np.testing.assert_array_equal(new[:, 1], 0.0)
    np.testing.assert_array_equal(new[:, 2:], old[:, 1:])
    _assert_trees_equal(params["pre_logits"], pretrained["pre_logits"])
