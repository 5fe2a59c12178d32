"""Self-supervised pretraining: MAE and masked patch prediction, with hand-computed numbers.

The pure parts (masking, corruption, colour targets, sin-cos table, patch order) are checked
against values worked out by hand or counted over many draws; the models against what they
must not see; the tasks end to end on the digits, into fine-tuning and the exported encoder.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import default as default_config
from tests import _compiled
from tests.test_train import train_scalars
from vit_jax import (
    checkpoint,
    checkpoint_geometry,
    encoder_tree,
    models,
    models_ssl,
    run_config,
    run_data,
    run_log,
    steps,
    tasks,
    train,
)
from vit_jax.tasks import self_supervised

# ----------------------------------------------------------------------------------------------
# Masks and targets.


def test_mae_masking_keeps_exactly_a_quarter_and_unshuffle_restores_the_order():
    n, patches = 6, 64
    masking = models_ssl.random_masking(jax.random.PRNGKey(3), n, patches, 0.75)
    assert masking.keep.shape == (n, 16)
    np.testing.assert_array_equal(masking.mask.sum(axis=1), np.full(n, 48.0))
    for i in range(n):  # the kept patches are exactly the unmasked ones
        assert set(np.asarray(masking.keep[i])) == set(np.flatnonzero(masking.mask[i] == 0))
    # Kept tokens + fillers for the masked ones, unshuffled: every patch back at its index.
    order = jnp.arange(patches, dtype=jnp.float32)[None, :, None]
    tokens = jnp.broadcast_to(order, (n, patches, 1))
    shuffle = jnp.argsort(masking.restore, axis=1)  # patch index of each shuffled position
    shuffled = jnp.take_along_axis(tokens, shuffle[..., None], axis=1)
    restored = models_ssl.unshuffle(shuffled[:, :16], shuffled[:, 16:], masking.restore)
    np.testing.assert_array_equal(restored, tokens)
    # Per-example masks differ, and another key draws another mask.
    assert len({tuple(np.asarray(m)) for m in masking.mask}) == n
    other = models_ssl.random_masking(jax.random.PRNGKey(4), n, patches, 0.75)
    assert not np.array_equal(other.mask, masking.mask)
    assert models_ssl.kept_patches(196, 0.75) == 49  # MAE's ViT-B/16 at 224 px


def test_mpp_corrupts_exactly_half_and_splits_them_80_10_10():
    n, patches, draws = 16, 64, 50
    counts = np.zeros(3)
    for seed in range(draws):
        c = models_ssl.mpp_corruption(jax.random.PRNGKey(seed), n, patches)
        corrupted = np.asarray(c.corrupted, bool)
        np.testing.assert_array_equal(corrupted.sum(axis=1), np.full(n, 32))
        own = np.arange(n * patches).reshape(n, patches)
        use_mask, source = np.asarray(c.use_mask_token), np.asarray(c.source)
        other = source != own
        assert not np.any((use_mask | other) & ~corrupted)  # only corrupted patches change
        assert not np.any(use_mask & other)
        counts += [use_mask.sum(), other.sum(), (corrupted & ~use_mask & ~other).sum()]
    total = draws * n * 32  # 25,600 corrupted patches
    assert counts.sum() == total
    for count, p in zip(counts, (0.8, 0.1, 0.1), strict=True):
        sigma = math.sqrt(total * p * (1 - p))  # binomial: 64 and 48 patches
        assert abs(count - total * p) < 4 * sigma, counts / total


def _pixels(rgb):
    """uint8 colours → the pipeline's [-1, 1] values."""
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


def test_mean_color_targets_of_hand_made_patches():
    image = np.zeros((1, 8, 8, 3), np.float32)
    image[0, :4, :4] = _pixels([255, 0, 128])  # mean (1, 0, 0.502): levels (7, 0, 4)
    image[0, :4, 4:] = _pixels([0, 0, 0])
    image[0, :4, 6:] = _pixels([255, 255, 255])  # half black, half white: 0.5 → level 4 each
    image[0, 4:, :4] = _pixels([31, 32, 224])  # 0.1216 → 0, 0.1255 → 1, 0.878 → 7
    image[0, 4:, 4:] = _pixels([255, 255, 255])  # 1.0 is level 7, not 8
    classes = models_ssl.color_targets(jnp.asarray(image), patch=4)
    assert classes.shape == (1, 4, 1)
    expected = [7 * 64 + 0 * 8 + 4, 4 * 64 + 4 * 8 + 4, 0 * 64 + 1 * 8 + 7, 511]
    np.testing.assert_array_equal(classes[0, :, 0], expected)
    # The 4x4-downsized version of an 8 px patch: 16 cells of 2x2 pixels, row-major.
    patch = np.zeros((1, 8, 8, 3), np.float32)
    patch[0, :, :] = _pixels([0, 0, 0])
    patch[0, 0:2, 2:4] = _pixels([255, 0, 0])  # cell 1: red
    patch[0, 6:8, 0:2] = _pixels([0, 0, 255])  # cell 12: blue
    cells = models_ssl.color_targets(jnp.asarray(patch), patch=8, cells=4)
    want = np.zeros(16, int)
    want[1], want[12] = 7 * 64, 7
    np.testing.assert_array_equal(cells[0, 0], want)


def test_sincos_table_values():
    table = models_ssl.sincos_2d((2, 3), 8)
    assert table.shape == (1, 7, 8)
    np.testing.assert_array_equal(table[0, 0], np.zeros(8))  # the class token's row
    # Patch (row 1, col 2) is row 1 + 1·3 + 2 = 6; ω = (1, 1/100) for width 8.
    want = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    want += [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    np.testing.assert_allclose(table[0, 6], want, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        models_ssl.sincos_2d((2, 2), 6)


def test_patchify_order_and_inverse():
    images = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
    patches = models_ssl.patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(patches[1, 4], images[1, 4:8, 4:8].reshape(-1))  # row 1, col 1
    np.testing.assert_array_equal(models_ssl.unpatchify(patches, 4, (2, 3)), images)


# ----------------------------------------------------------------------------------------------
# The models and losses.


def _config(task: str, **updates):
    c = default_config.get_config().pretrain
    c.model.update(hidden_size=32, patches={"size": (4, 4)})
    c.model.transformer.update(num_layers=1, mlp_dim=64, num_heads=4)
    c.update(image_size=16, batch_size=64, warmup_steps=10, base_lr=2e-3, log_every=50)
    c.update(checkpoint_every=0, task=task, loss="mse" if task == "mae" else "softmax_xent")
    c.mae.update(decoder_width=32, decoder_depth=1, decoder_heads=4)
    for key, value in updates.items():  # 'mae.mask_ratio' sets config.mae.mask_ratio
        target, _, leaf = key.rpartition(".")
        (c[target] if target else c)[leaf] = value
    return c


class _Info:
    num_classes, target_names, num_features = 10, (), 0


def _task_and_model(config):
    task = tasks.make_task(config, _Info())
    model = task.wrap_model(run_config.make_model(config, **task.head()))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    return task, model, _compiled.init_params(model, images), images


def test_mae_encoder_never_sees_the_masked_patches():
    _, model, params, images = _task_and_model(_config("mae"))
    assert set(params) == {"encoder", "decoder"}
    assert {"embedding", "cls", "Transformer"} == set(params["encoder"])  # the ViT's names
    (pred, mask), state = _compiled.apply(model, params, images, mutable=["intermediates"])
    encoded = state["intermediates"]["encoder"]["encoded"][0]
    assert encoded.shape == (2, 1 + 4, 32)  # the class token and 4 of 16 patches
    assert pred.shape == (2, 16, 48) and float(mask.sum()) == 2 * 12
    # Repaint every masked patch: the prediction cannot change (nothing sees them).
    masked = models_ssl.unpatchify(mask[..., None] * jnp.ones((2, 16, 48)), 4, (4, 4)) > 0
    repainted = jnp.where(masked, -images, images)
    pred2, mask2 = _compiled.apply(model, params, repainted)
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_allclose(pred2, pred, atol=1e-6)
    assert not np.allclose(repainted, images)


def test_mae_loss_counts_the_masked_patches_only():
    task, model, params, images = _task_and_model(_config("mae", **{"mae.norm_pix_loss": False}))
    pred, mask = _compiled.apply(model, params, images)
    loss = task.reconstruction_loss(images, pred, mask)
    target = models_ssl.patchify(images, 4)
    by_hand = [
        np.mean([np.mean((pred[i, j] - target[i, j]) ** 2) for j in range(16) if mask[i, j]])
        for i in range(2)
    ]
    np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
    # New pixels in a visible patch's target (predictions held fixed): the same loss.
    visible = int(np.flatnonzero(np.asarray(mask[0]) == 0)[0])
    row, col = divmod(visible, 4)
    changed = images.at[0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].set(0.9)
    np.testing.assert_allclose(task.reconstruction_loss(changed, pred, mask), loss, rtol=1e-6)
    masked = int(np.flatnonzero(np.asarray(mask[0]))[0])
    row, col = divmod(masked, 4)
    changed = images.at[0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].set(0.9)
    assert float(task.reconstruction_loss(changed, pred, mask)[0]) != pytest.approx(float(loss[0]))
    # norm_pix_loss: each target patch has mean 0 and variance 1 (up to eps).
    normed = self_supervised.MaskedAutoencoding(_config("mae"), _Info()).pixel_targets(images)
    np.testing.assert_allclose(normed.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(normed.var(-1, ddof=1), 1, atol=1e-3)  # unbiased, as MAE


def test_mpp_predicts_every_corrupted_patch_from_its_token():
    task, model, params, images = _task_and_model(_config("mpp"))
    assert set(params) == {"encoder", "mask_token", "mpp_head"}
    outputs, corrupted = _compiled.apply(model, params, images)
    assert outputs.shape == (2, 16, 512) and float(corrupted.sum()) == 16
    values = task.patch_losses(images, outputs, corrupted)
    classes = models_ssl.color_targets(images, 4)[..., 0]
    logp = jax.nn.log_softmax(outputs)
    by_hand = [
        -np.mean([logp[i, j, classes[i, j]] for j in range(16) if corrupted[i, j]])
        for i in range(2)
    ]
    np.testing.assert_allclose(values["loss"], by_hand, rtol=1e-5)
    pixels = _config("mpp", loss="mse", **{"mpp.target": "pixels"})
    *_, pixel_params, _ = _task_and_model(pixels)
    assert pixel_params["mpp_head"]["kernel"].shape == (32, 48)


@pytest.mark.parametrize(
    ("task", "updates", "message"),
    [
        ("mae", {"mae.mask_ratio": 1.0}, r"mae.mask_ratio must be in \(0, 1\), got 1.0"),
        ("mae", {"mae.mask_ratio": 0.0}, r"mae.mask_ratio must be in \(0, 1\)"),
        ("mae", {"mixup_alpha": 0.8}, "mixup_alpha=0.8 mixes or smooths labels"),
        ("mae", {"label_smoothing": 0.1}, "does not read"),
        ("mae", {"loss": "softmax_xent"}, "Unknown loss='softmax_xent' for task='mae'"),
        ("mae", {"mae.decoder_heads": 3}, "decoder_width=32 must be divisible"),
        ("mpp", {"mpp.target": "pixels"}, "learnt with loss='mse'"),
        ("mpp", {"mpp.target": "rgb"}, "Unknown mpp.target='rgb'"),
        ("mpp", {"mpp.corrupt_ratio": 1.5}, r"mpp.corrupt_ratio must be in \(0, 1\)"),
        ("mpp", {"mpp.mask_fraction": 0.95}, "must be ≤ 1"),
        ("mpp", {"model.classifier": "gap"}, "needs a ViT with a class token"),
        ("mae", {"model.representation_size": 32}, "would put a tanh layer on each"),
    ],
)
def test_pretraining_options_are_checked_before_any_work(task, updates, message):
    config = _config(task, **updates)
    with pytest.raises(ValueError, match=message):
        tasks.check_config(config)


def test_a_mixer_cannot_be_pretrained_with_mae():
    config = _config("mae")
    config.model = models.model_config("Mixer-B_16")
    with pytest.raises(ValueError, match="pretrains a plain ViT encoder; Mixer-B_16 is not one"):
        tasks.check_config(config)


# ----------------------------------------------------------------------------------------------
# End to end: pretrain, export, fine-tune.

FEWSHOT_MARGIN = 0.04  # MAE's 5-shot accuracy over random-init features (measured 0.047–0.066)


@pytest.mark.parametrize("task", ["mae", "mpp"])
def test_pretraining_learns_exports_its_encoder_and_fine_tunes(task, tmp_path, caplog):
    """Measured (2026-12-02, AVX512-BF16 kind, seed 0, 150 steps): MAE's masked-patch loss
    0.761, where predicting 0 scores 1.0 (norm-pix targets have variance 1 per patch); MPP's
    colour accuracy on the corrupted patches 0.462, where always answering the most common
    colour (black) scores 0.383 on the digits' test patches. Floors: 0.85 and 0.42.

    Few-shot (5 per class, 3 draws) of the MAE encoder's features against the same encoder at
    its random init, seeds 0/1/2: 0.344 / 0.290 / 0.316 against 0.278 / 0.243 / 0.267, a margin
    of 0.047–0.066; asserted: ≥ 0.04. Masked patch prediction's margin after 150 steps was
    −0.009 … +0.091, so it is not asserted here (after 2,000 steps it is clear:
    benchmarks/RESULTS.md).
    """
    config = _config(task, total_steps=150, eval_every=75, **{"fewshot.every": 75})
    config.fewshot.shots = (1, 5)
    workdir = tmp_path / task
    _, metrics = train.train_and_evaluate(config, str(workdir))
    assert metrics["count"] == 360
    if task == "mae":
        assert metrics["loss"] < 0.85, metrics
    else:
        assert metrics["color_accuracy"] > 0.42, metrics
    info = json.loads((workdir / tasks.INFO_FILE).read_text())
    assert info["task"] == task and info["encoder"] == encoder_tree.ENCODER_FILE
    pictures = sorted(p.name for p in (workdir / run_log.PICTURES_DIR).glob("*.png"))
    if task == "mae":  # original | masked | reconstruction, one row per image, each evaluation
        assert pictures == ["150.png", "75.png"]
        picture = np.asarray(Image.open(workdir / run_log.PICTURES_DIR / "150.png"))
        assert picture.shape == (4 * 16, 3 * 16, 3) and picture.dtype == np.uint8
        original, masked, pasted = np.split(picture[:16].astype(int), 3, axis=1)
        hidden = (masked == 127).all(axis=-1)  # masked patches are grey (0 in [-1, 1])
        assert 0.7 < hidden.mean() < 0.8  # 12 of 16 patches (an original pixel may be 127 too)
        assert np.abs(pasted - original)[~hidden].max() <= 1  # visible patches as they are
        assert np.abs(pasted - original)[hidden].mean() > 1  # the rest predicted, not copied
    else:
        assert pictures == []
    scalars = train_scalars(workdir)
    assert sorted(scalars["fewshot/5shot"]) == [75, 150]
    if task == "mae":  # pretrained features beat random ones (the same init, before training)
        mae = tasks.make_task(config, run_data.dataset_info(config))
        model = mae.wrap_model(run_config.make_model(config, **mae.head()))
        random_init = train.create_state(config, model, run_config.make_schedule(config)).params
        evaluator = run_data.fewshot_evaluator(config)
        chance = evaluator(steps.replicate(random_init))["5shot"]
        assert scalars["fewshot/5shot"][150] >= chance + FEWSHOT_MARGIN, (scalars, chance)
    full = checkpoint.load(workdir / train.PARAMS_FILE)
    encoder = checkpoint.load(workdir / encoder_tree.ENCODER_FILE)
    assert set(encoder) == {"embedding", "cls", "Transformer"}
    same = jax.tree.map(np.array_equal, encoder, full["encoder"])
    assert all(jax.tree.leaves(same))
    # predict / attention / a teacher refuse the pretraining tree with the way out.
    with pytest.raises(ValueError, match=r"no head to predict with\. Fine-tune them first"):
        checkpoint_geometry.model_for_checkpoint(full, "testing")

    # Fine-tuning from the workdir: the encoder loaded exactly, the rest reported as dropped.
    finetune = default_config.get_config().finetune
    finetune.model = config.model.copy_and_resolve_references()
    finetune.update(image_size=16, batch_size=64, pretrained=str(workdir))
    classifier = run_config.make_model(finetune, num_classes=10)
    with caplog.at_level(logging.WARNING, logger="root"):
        state = train.create_state(finetune, classifier, run_config.make_schedule(finetune))
    dropped = [r.getMessage() for r in caplog.records if "self-supervised" in r.getMessage()]
    part = "decoder (MAE decoder" if task == "mae" else "mpp_head (masked patch prediction head"
    assert len(dropped) == 1 and part in dropped[0], dropped
    loaded = {k: v for k, v in state.params.items() if k != "head"}
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, encoder)))
    assert set(state.params) == {"embedding", "cls", "Transformer", "head"}
    # encoder.npz alone is a plain released ViT file: the same params, nothing to drop.
    finetune.pretrained = str(workdir / encoder_tree.ENCODER_FILE)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="root"):
        again = train.create_state(finetune, classifier, run_config.make_schedule(finetune))
    assert not [r for r in caplog.records if "self-supervised" in r.getMessage()]
    loaded = {k: v for k, v in again.params.items() if k != "head"}
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, encoder)))


# ----------------------------------------------------------------------------------------------
# Recipes and the fine-tuning options they need.


def test_the_recipes_are_the_papers():
    from configs import finetune_mae, pretrain_mae, pretrain_mpp

    mae = pretrain_mae.get_config("ViT-B_16")
    run_config.validate_config(mae, 8, 8)
    steps_per_epoch = math.ceil(1_281_167 / 4096)  # 313
    assert (mae.task, mae.loss, mae.batch_size, mae.optimizer) == ("mae", "mse", 4096, "adamw")
    assert (mae.adam_b1, mae.adam_b2, mae.weight_decay) == (0.9, 0.95, 0.05)
    assert mae.base_lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert (mae.total_steps, mae.warmup_steps) == (800 * steps_per_epoch, 40 * steps_per_epoch)
    assert mae.crop_min_area == 0.2 and mae.mae.mask_ratio == 0.75 and mae.mae.norm_pix_loss
    assert (mae.mae.decoder_depth, mae.mae.decoder_width, mae.mae.decoder_heads) == (8, 512, 16)
    assert mae.model.transformer.dropout_rate == 0.0

    mpp = pretrain_mpp.get_config("ViT-B_16,cifar10")
    run_config.validate_config(mpp, 8, 8)
    assert (mpp.task, mpp.optimizer, mpp.base_lr, mpp.batch_size) == ("mpp", "adam", 2e-4, 4096)
    assert (mpp.warmup_steps, mpp.decay_type, mpp.mpp.corrupt_ratio) == (10_000, "cosine", 0.5)
    assert mpp.model.transformer.dropout_rate == 0.1  # B: the supervised pretraining's

    tune = finetune_mae.get_config("ViT-B_16")
    run_config.validate_config(tune, 8, 8)
    assert tune.model.model_name == "ViT-B_16-gap-norep" and tune.model.classifier == "gap"
    assert (tune.layer_decay, tune.drop_path_rate, tune.label_smoothing) == (0.65, 0.1, 0.1)
    assert (tune.mixup_alpha, tune.cutmix_alpha) == (0.8, 1.0)
    assert tune.base_lr == pytest.approx(5e-4 * 1024 / 256)
    assert tune.total_steps == 100 * math.ceil(1_281_167 / 1024)
    large = finetune_mae.get_config("ViT-L_16,cifar10")
    assert (large.layer_decay, large.total_steps) == (0.75, 50 * math.ceil(50_000 / 1024))
    with pytest.raises(ValueError, match="No MAE preset for dataset 'mnist'"):
        pretrain_mae.get_config("ViT-B_16,mnist")


def test_layer_decay_scales_each_block_by_its_depth():
    from vit_jax import optim

    model = models.get_model("testing", num_classes=3, transformer={"num_layers": 2})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
    tx = optim.make_optimizer(
        "sgd", lambda step: 1.0, grad_clip_norm=None, momentum=0.0, layer_decay=0.5, num_layers=2
    )
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    scale = {k: -float(np.ravel(v)[0]) for k, v in checkpoint.flatten(updates).items()}
    # decay^(L + 1 − id): embedding, class token, positions 0.5³; block i 0.5^(2 − i); rest 1.
    assert scale["embedding/kernel"] == scale["cls"] == 0.125
    assert scale["Transformer/posembed_input/pos_embedding"] == 0.125
    assert scale["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] == 0.25
    assert scale["Transformer/encoderblock_1/LayerNorm_0/scale"] == 0.5
    assert scale["Transformer/encoder_norm/bias"] == scale["head/kernel"] == 1.0
    # A pretraining tree's ViT, under `encoder`, is numbered as the ViT itself.
    wrapped = {"encoder": params, "decoder": {"kernel": jnp.ones((2, 2))}}
    ids = optim.layer_ids(wrapped, 2)
    assert ids["encoder"]["embedding"]["kernel"] == 0 and ids["encoder"]["cls"] == 0
    assert ids["encoder"]["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"] == 2
    assert ids["decoder"]["kernel"] == 3
    # A scanned encoder (one stacked block) gets the same per-layer factors.
    stacked = checkpoint.scan_params(params)
    scanned, _ = tx.update(jax.tree.map(jnp.ones_like, stacked), tx.init(stacked), stacked)
    kernel = scanned["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(-kernel[:, 0, 0], [0.25, 0.5])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
            optim.make_optimizer("sgd", lambda step: 1.0, layer_decay=bad, num_layers=2)
    config = _config("mae", crop_min_area=0.0)
    with pytest.raises(ValueError, match=r"crop_min_area must be in \(0, 1\]"):
        run_config.validate_config(config, 8, 8)
