"""Tests for the training loop (vit_jax/train.py, steps.py, run_config.py, run_log.py) and the
classification task, on 8 fake CPU devices (see conftest.py)."""

import functools
import glob
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import tensorflow as tf
from flax import jax_utils

from configs import common
from configs import default as default_config
from vit_jax import checkpoint, run_config, run_data, run_log, steps, train
from vit_jax.tasks import classification

DIGITS_TEST = 360  # examples in the embedded digits test split


_TEN_CLASSES = types.SimpleNamespace(num_classes=10, class_names=None)  # a DatasetInfo's fields


def _classification(**overrides):
    """The classification task of the common config (softmax cross-entropy), 10 classes."""
    return classification.Classification(tiny_config(**overrides), _TEN_CLASSES)


def train_scalars(workdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in the TensorBoard event files in `workdir`."""
    scalars = {}
    for path in sorted(glob.glob(f"{workdir}/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.HasField("tensor"):
                    array = tf.make_ndarray(value.tensor)
                    if array.shape or not np.issubdtype(array.dtype, np.number):
                        continue  # hparams and other non-scalar summaries
                    number = float(array)
                else:
                    continue
                scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


def tiny_config(**overrides):
    config = common.get_config()
    config.model = common.model_config(
        "testing", patches={"size": (4, 4)}, transformer={"dropout_rate": 0.0}
    )
    config.image_size = 8
    config.batch_size = 16
    config.total_steps = 3
    config.warmup_steps = 1
    config.log_every = 1
    if "model" in overrides:  # replaced whole: update() would merge it into the testing model's
        config.model = overrides.pop("model")
    config.update(overrides)
    return config


def test_pretrain_then_finetune_at_twice_the_resolution(tmp_path):
    config = default_config.get_config()
    for name, size in (("pretrain", 8), ("finetune", 16)):
        phase = config[name]
        phase.model = tiny_config().model
        phase.update(image_size=size, batch_size=16, total_steps=2, warmup_steps=1, log_every=1)
    results = train.train_phases(config, str(tmp_path))
    assert set(results) == {"pretrain", "finetune"}
    for name, metrics in results.items():
        assert metrics["count"] == DIGITS_TEST  # every test example once, padding masked out
        # Both phases start from a zero head (a fresh one for the fine-tuning): every logit is 0,
        # so the first step's loss is log(10) whatever the images. Two steps learn nothing
        # measurable on the test split, so its accuracy is not checked here (test_learns.py).
        step1 = train_scalars(tmp_path / name)["train/loss"][1]
        np.testing.assert_allclose(step1, math.log(10), rtol=1e-6)
        assert np.isfinite(metrics["loss"])
    pre = checkpoint.load(tmp_path / "pretrain" / "params.npz")
    fine = checkpoint.load(tmp_path / "finetune" / "params.npz")
    assert pre["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 5, 10)
    assert fine["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 10)


def test_train_and_evaluate_returns_state_and_writes_params(tmp_path):
    state, metrics = train.train_and_evaluate(tiny_config(eval_every=2), str(tmp_path))
    assert int(state.step) == 3
    saved = checkpoint.load(tmp_path / "params.npz")
    leaves = jax.tree.leaves(jax.tree.map(np.allclose, saved, jax.device_get(state.params)))
    assert all(leaves)
    assert metrics["count"] == DIGITS_TEST


def test_a_run_traces_its_train_and_eval_steps_once(tmp_path, monkeypatch):
    """Steps fed their own outputs (and the final eval fed the host state) compile once."""
    traces = {"train_step": 0, "eval_step": 0}
    for name in traces:
        original = getattr(steps, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            traces[_name] += 1  # runs when jax traces the step, not per call
            return _original(*args, **kwargs)

        monkeypatch.setattr(steps, name, counted)
    train.train_and_evaluate(tiny_config(eval_every=1), str(tmp_path))  # 3 steps, 3 evals
    assert traces == {"train_step": 1, "eval_step": 1}


def _sgd_state_and_step(accum_steps, mixup_alpha=0.0):
    config = tiny_config(optimizer="sgd", momentum=0.0, grad_clip_norm=0.0, base_lr=0.5)
    config.update(accum_steps=accum_steps, warmup_steps=0, mixup_alpha=mixup_alpha)
    model = run_config.make_model(config, num_classes=10)
    schedule = run_config.make_schedule(config)
    state = train.create_state(config, model, schedule)
    task = classification.Classification(config, _TEN_CLASSES)
    return steps.replicate(state), steps.make_train_step(task, schedule, config.accum_steps)


def _random_batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (8, 8, 8, 8, 3)).astype(np.float32)  # 8 devices × 8 examples
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, (8, 8))]
    return {"image": images, "label": labels}


def test_gradient_accumulation_gives_the_same_sgd_update():
    batch = _random_batch()
    key = steps.replicate(jax.random.PRNGKey(0))
    results = {}
    for k in (1, 4):
        state, step = _sgd_state_and_step(k)
        before = jax.device_get(jax_utils.unreplicate(state.params))
        state, metrics = step(state, batch, key)
        results[k] = (jax.device_get(jax_utils.unreplicate(state.params)), metrics)
    (p1, m1), (p4, m4) = results[1], results[4]
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), p1, before))
    assert max(moved) > 1e-3  # the update is not trivially zero
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(m1["lr"][0], 0.5 * 0.5 * (1 + np.cos(np.pi / 3)), rtol=1e-6)


def test_mixup_mixes_images_and_labels_with_one_lambda():
    """Example i is mixed with example n-1-i by one λ, the same for images and labels."""
    batch = _random_batch()
    images, labels = batch["image"][0, :7], batch["label"][0, :7]  # odd: example 3 is its own pair
    mixed_images, mixed_labels = classification.mixup(images, labels, jax.random.PRNGKey(1), 0.4)
    # m = λ·x + (1-λ)·r with r = x reversed ⇒ m - r = λ·(x - r): λ by least squares.
    d, e = images - images[::-1], np.asarray(mixed_images) - images[::-1]
    lam = float(np.sum(d * e) / np.sum(d * d))
    assert 0.1 < lam < 0.9 and not np.isclose(lam, 0.5)  # a real mix, not a no-op or a swap
    np.testing.assert_allclose(mixed_images, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    np.testing.assert_allclose(mixed_labels, lam * labels + (1 - lam) * labels[::-1], atol=1e-5)
    np.testing.assert_allclose(mixed_images[3], images[3], rtol=1e-6)  # the middle one: unmixed
    np.testing.assert_allclose(mixed_labels.sum(axis=-1), 1.0, rtol=1e-6)  # still distributions
    assert mixed_labels.dtype == labels.dtype


def test_mixup_with_a_tiny_alpha_keeps_or_swaps_the_pair():
    """Beta(α, α) with α → 0 puts λ at 0 or 1: each example is itself or its partner."""
    images = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(4, 1, 1, 1)
    labels = np.eye(4, dtype=np.float32)
    for seed in range(4):
        mixed, mixed_labels = classification.mixup(images, labels, jax.random.PRNGKey(seed), 1e-3)
        flat = np.asarray(mixed).ravel()
        assert np.allclose(flat, [1, 2, 3, 4], atol=1e-3) or np.allclose(
            flat, [4, 3, 2, 1], atol=1e-3
        ), flat
        np.testing.assert_allclose(mixed_labels @ np.arange(1.0, 5.0), flat, atol=1e-3)


def test_mixup_changes_the_step_and_alpha_zero_is_the_plain_step():
    batch = _random_batch()
    key = steps.replicate(jax.random.PRNGKey(0))
    noise = np.random.default_rng(1)  # the zero-initialised head alone would give loss log(10)
    losses = {}
    for alpha in (0.0, 0.4):
        state, step = _sgd_state_and_step(1, mixup_alpha=alpha)
        if alpha == 0.0:
            params = jax.tree.map(
                lambda p: p + 0.3 * noise.standard_normal(p.shape, np.float32),
                jax_utils.unreplicate(state.params),
            )
        _, metrics = step(state.replace(params=steps.replicate(params)), batch, key)
        losses[alpha] = float(metrics["loss"][0])
    # alpha=0: the loss of the un-mixed batch (no dropout in tiny_config), as before mixup existed:
    # the mean of -log softmax(logits)[label], in float64 here.
    apply = jax.jit(functools.partial(state.apply_fn, train=False))
    logits = np.asarray(apply({"params": params}, batch["image"].reshape(64, 8, 8, 3)), np.float64)
    labels = batch["label"].reshape(64, 10).argmax(-1)
    log_p = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    plain = -log_p[np.arange(64), labels].mean()
    assert abs(plain - math.log(10)) > 0.1  # the noise moved the logits off the zero head's
    np.testing.assert_allclose(losses[0.0], plain, rtol=1e-5)
    assert abs(losses[0.4] - losses[0.0]) > 1e-3


def test_micro_batches_get_distinct_dropout_keys():
    """Micro-batch i draws from fold_in(rng, i): the mean of the draws differs from draw 0."""
    batch = {"x": jnp.arange(8.0)}

    def record(params, micro, key):
        return jnp.sum(micro["x"]) * 0.0, {"k": jax.random.uniform(key)}

    _, grads = steps.accumulate_gradients(
        record, {"k": jnp.zeros(())}, batch, jax.random.PRNGKey(0), 4
    )
    # The mean of 4 uniform draws from identical keys would equal each draw: compare with key 0.
    first = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(0), 0))
    expected = np.mean(
        [jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(0), i)) for i in range(4)]
    )
    np.testing.assert_allclose(grads["k"], expected, rtol=1e-6)
    assert not np.isclose(grads["k"], first)


def _fake_apply(variables, images, train):
    """Logits = one-hot of the class written into pixel (0, 0, 0): always right."""
    del variables, train
    return jax.nn.one_hot(images[:, 0, 0, 0].astype(jnp.int32), 10)


def test_eval_weights_by_mask_and_counts_every_example_once():
    step = jax.pmap(
        functools.partial(steps.eval_step, apply_fn=_fake_apply, task=_classification()),
        axis_name="batch",
    )
    classes = np.arange(8 * 4).reshape(8, 4) % 10
    images = np.zeros((8, 4, 2, 2, 3), np.float32)
    images[..., 0, 0, 0] = classes
    labels = np.eye(10, dtype=np.float32)[classes]
    mask = np.ones((8, 4), np.float32)
    labels[1, 3] = np.eye(10)[(classes[1, 3] + 1) % 10]  # one wrong real example
    mask[7, 2:] = 0.0  # two padded entries, wrong labels: must not count
    labels[7, 2:] = 0.0
    batch = {"image": images, "label": labels, "mask": mask}
    metrics = steps.evaluate(step, {}, [batch, batch], _classification())
    assert metrics["count"] == 2 * 30
    assert metrics["accuracy"] == pytest.approx(58 / 60)
    assert metrics["accuracy_top5"] == pytest.approx(58 / 60)  # the wrong class is not in top-5


def test_softmax_xent_with_label_smoothing_by_hand():
    # Logits log([1, 2, 5]): softmax p = [1/8, 2/8, 5/8], -log p = [log 8, log 4, log 8/5]
    #   = [2.0794415, 1.3862944, 0.4700036].
    # Smoothing 0.1 over 3 classes: the label's class gets 0.9 + 0.1/3 = 14/15, the others 1/30.
    #   label 2: 14/15·log(8/5) + (log 8 + log 4)/30 = 0.4386701 + 0.1155245 = 0.5541946
    #   label 0: 14/15·log 8 + (log 4 + log(8/5))/30 = 1.9408121 + 0.0618766 = 2.0026887
    logits = jnp.log(jnp.array([[1.0, 2.0, 5.0], [1.0, 2.0, 5.0]]))
    labels = jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    smoothed = classification.compute_loss(logits, labels, "softmax_xent", label_smoothing=0.1)
    np.testing.assert_allclose(smoothed, [0.5541946, 2.0026887], rtol=1e-6)
    plain = classification.compute_loss(logits, labels, "softmax_xent")  # -log(5/8), -log(1/8)
    np.testing.assert_allclose(plain, [0.4700036, 2.0794415], rtol=1e-6)


def test_sigmoid_xent_sums_over_classes_by_hand():
    # sigmoid(0) = 1/2, sigmoid(log 3) = 3/4, sigmoid(-log 3) = 1/4; per class -log p(label).
    #   labels [1, 0, 1]: log 2 + log 4 + log 4 = log 32                    = 3.4657359
    #   labels [1, 1, 0]: log 2 + log(4/3) + log(4/3)                       = 1.2685113
    #   logits [100, -100, 0], labels [0, 0, 0]: 100 + log(1 + e^-100) + log 2 = 100.6931472
    #   (no overflow: a naive log(1 - sigmoid(100)) in float32 would be -log 0 = inf)
    log3 = math.log(3)
    logits = jnp.array([[0.0, log3, -log3], [0.0, log3, -log3], [100.0, -100.0, 0.0]])
    labels = jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    loss = classification.compute_loss(logits, labels, "sigmoid_xent")
    np.testing.assert_allclose(loss, [3.4657359, 1.2685113, 100.6931472], rtol=1e-6)


# Logits log(w), w = [8, 4, 2, 1, 0.75, 0.25] (sum 16): softmax p = w/16, so the class ranked r
# costs -log p = log 2, log 4, log 8, log 16, log(64/3), log 64. Example i's logits are these
# rolled by i (the class ranked r is (r + i) % 6); its id i is written into pixel (0, 0, 0).
_FIXED_LOGITS = np.stack([np.roll(np.log([8, 4, 2, 1, 0.75, 0.25]), i) for i in range(32)])


def _fixed_logits_apply(variables, images, train):
    del variables, train
    return jnp.asarray(_FIXED_LOGITS, jnp.float32)[images[:, 0, 0, 0].astype(jnp.int32)]


def _ranked_batch(ranks, mask, first_id):
    """8 devices × 2 examples; example i's label is its class ranked ranks[i]."""
    ids = first_id + np.arange(16).reshape(8, 2)
    images = np.zeros((8, 2, 1, 1, 3), np.float32)
    images[..., 0, 0, 0] = ids
    labels = np.eye(6, dtype=np.float32)[(np.asarray(ranks) + ids) % 6]
    return {"image": images, "label": labels, "mask": np.asarray(mask, np.float32)}


def test_eval_of_fixed_logits_on_8_devices_by_hand():
    # Batch 1: 13 real examples, 3 padded ones (mask 0) whose labels would be top-1 hits.
    ranks_1 = [[0, 1], [0, 5], [2, 0], [0, 0], [1, 0], [3, 0], [0, 3], [0, 0]]
    mask_1 = [[1, 1], [1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [0, 0]]
    # Batch 2: one real example (rank 5) on device 0, the rest padding.
    ranks_2 = [[5, 0]] + [[0, 0]] * 7
    mask_2 = [[1, 0]] + [[0, 0]] * 7
    batches = [_ranked_batch(ranks_1, mask_1, 0), _ranked_batch(ranks_2, mask_2, 16)]
    task = _classification()
    step = steps.make_eval_step(types.SimpleNamespace(apply=_fixed_logits_apply), task)
    metrics = steps.evaluate(step, {}, batches, task)
    # Real ranks: 0 ×7, 1 ×2, 2 ×1, 3 ×2, 5 ×2 = 14 examples.
    #   top-1: the 7 of rank 0 → 7/14; top-5: all but the 2 of rank 5 → 12/14;
    #   loss: (7·1 + 2·2 + 1·3 + 2·4 + 2·6)·log 2 / 14 = 34·log 2 / 14 = 1.6833574.
    assert metrics["count"] == 14
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["accuracy_top5"] == pytest.approx(12 / 14)
    assert metrics["loss"] == pytest.approx(1.6833574, rel=1e-6)


def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch):
    def nan_loss(logits, labels, loss_name, label_smoothing=0.0):
        return jnp.full(logits.shape[:1], jnp.nan)

    monkeypatch.setattr(classification, "compute_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="at step 1"):
        train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert not (tmp_path / "params.npz").exists()


def test_nan_guard_names_the_first_bad_step_and_quantity():
    ok = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "param_norm": 3.0}
    bad_loss = {**ok, "loss": np.inf}
    bad_grads = {**ok, "grad_norm": np.nan}  # finite loss, but the new params would not be
    with pytest.raises(FloatingPointError, match="training loss inf at step 6"):
        run_log.check_finite([ok, bad_loss, ok], first_step=5)
    with pytest.raises(FloatingPointError, match="training grad_norm nan at step 7"):
        run_log.check_finite([ok, ok, bad_grads], first_step=5)
    run_log.check_finite([ok, ok], first_step=1)


def test_img_per_sec_leaves_out_compile_checkpoint_and_eval_time(monkeypatch):
    class Writer:
        def write_scalars(self, step, scalars):
            self.scalars = scalars

    step = steps.replicate({"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "param_norm": 3.0})
    # start; a pause of 50 s; a pause of 2 s; the write at 70 s (and the next window's start).
    clock = iter([0.0, 0.0, 50.0, 60.0, 62.0, 70.0, 70.0])
    monkeypatch.setattr(run_log, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    writer = Writer()
    metrics = run_log.TrainMetrics(writer, checkpoints=None, first_step=1, batch_size=16)
    with metrics.paused():  # e.g. the first step's compilation
        metrics.add(step)
    with metrics.paused(False):  # a later step: training time, reads no clock
        pass
    with metrics.paused():  # e.g. a checkpoint
        metrics.add(step)
    metrics.write(2)
    # 70 s in all, 50 + 2 of them paused: 32 images in 18 s of training, over 8 devices.
    assert writer.scalars["train/img_per_sec_per_core"] == pytest.approx(32 / 18 / 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 12}, r"batch_size=12 .* device count \(8\)"),
        ({"accum_steps": 3}, r"16 / 8 devices = 2\) must be divisible by accum_steps=3"),
        (
            {"loss": "xent"},
            "Unknown loss='xent' for task='classification'; valid values: softmax_xent, sigmoid_",
        ),
        ({"optimizer": "lamb"}, "Unknown optimizer='lamb'"),
        ({"decay_type": "exp"}, "Unknown decay_type='exp'"),
        ({"optim_dtype": "float16"}, "Unknown optim_dtype"),
        ({"image_size": 10}, r"Image size \(10, 10\) is not divisible by the patch size"),
        ({"total_steps": 5, "warmup_steps": 5}, "must be larger than warmup_steps"),
        ({"base_lr": -1.0}, "must be ≥ 0"),
        ({"label_smoothing": 0.1, "loss": "sigmoid_xent"}, "softmax_xent' only"),
        ({"mixup_alpha": -0.2}, r"mixup_alpha must be ≥ 0 \(0 = off\), got -0.2"),
        ({"cutmix_alpha": float("nan")}, r"cutmix_alpha must be ≥ 0 \(0 = off\), got nan"),
        ({"checkpoint_every": -1}, r"checkpoint_every must be ≥ 0 \(0 = only at the end\)"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be > 0, got 0"),
        ({"compute_dtype": "float16"}, "Unknown compute_dtype='float16'"),
        ({"attention_impl": "flash"}, "Unknown attention_impl='flash'"),
        ({"remat_policy": "all"}, "Unknown remat_policy='all'"),
        ({"batch_chunks": 0}, "batch_chunks must be an integer >= 1, got 0"),
        ({"matmul_dtype": "fp8"}, "Unknown matmul_dtype='fp8'; valid values: float32, bfloat16"),
        ({"optimizer": "sgd", "weight_decay": 0.1}, "optimizer 'sgd' takes no weight_decay"),
        (
            {"model": common.model_config("Mixer-B_16"), "scan_layers": True},
            r"Mixer-B_16 \(a mixer model\) takes compute_dtype, head_hidden_size only; unset "
            "scan_layers",
        ),
        (
            {"model": common.model_config("testing-swin"), "layer_decay": 0.65},
            r"testing-swin \(a swin model\) takes compute_dtype, head_hidden_size, "
            "drop_path_rate only; unset layer_decay",
        ),
        (
            {
                "attention_impl": "xla",
                "model": common.model_config(
                    "testing", patches={"size": (4, 4)}, transformer={"attention_dropout_rate": 0.1}
                ),
            },
            r"attention_impl='xla' has no attention dropout.*attention_dropout_rate=0.1",
        ),
    ],
)
def test_config_errors_are_clear(overrides, message):
    with pytest.raises(ValueError, match=message):
        run_config.validate_config(tiny_config(**overrides), 8, 8)


def test_fast_model_options_train_to_the_reference_params(tmp_path):
    """Fused attention + remat + scan + batch chunks (fp32) train like the reference; bf16 and
    bf16 matmuls too.

    Every run starts from the same params.npz (scan would draw a different fresh init) with the
    head re-initialised to zeros, and without dropout, so the runs see identical arithmetic.
    """
    model = common.model_config(
        "testing", patches={"size": (4, 4)}, transformer={"dropout_rate": 0.0}
    )
    train.train_and_evaluate(tiny_config(model=model, total_steps=2), str(tmp_path / "start"))
    runs = {
        "reference": {},
        "fast_fp32": {
            "attention_impl": "xla",
            "remat_policy": "nothing_saveable",
            "scan_layers": True,
            "batch_chunks": 2,
        },
        "bf16": {"compute_dtype": "bfloat16", "scan_layers": True},
        "bf16_matmuls": {"matmul_dtype": "bfloat16", "batch_chunks": 2},
    }
    params = {}
    for name, options in runs.items():
        config = tiny_config(model=model, pretrained=str(tmp_path / "start"), **options)
        train.train_and_evaluate(config, str(tmp_path / name))
        params[name] = checkpoint.load(tmp_path / name / "params.npz")  # released layout
    assert jax.tree.structure(params["fast_fp32"]) == jax.tree.structure(params["reference"])
    ref, fast, bf16, bf16_matmuls = (
        np.concatenate([x.ravel() for x in jax.tree.leaves(params[n])]) for n in runs
    )
    np.testing.assert_allclose(fast, ref, atol=1e-5)
    for name, got in (("bf16", bf16), ("bf16_matmuls", bf16_matmuls)):
        delta = float(np.abs(got - ref).max())
        assert 1e-6 < delta < 0.05, name  # really computed in bf16, and still the same training


@pytest.mark.parametrize("earlier_attempt", [False, True])
def test_missing_pretrained_file_fails_before_reading_the_dataset(
    tmp_path, monkeypatch, earlier_attempt
):
    def no_dataset(config):
        raise AssertionError("the dataset was read before the pretrained path was checked")

    monkeypatch.setattr(run_data, "dataset_info", no_dataset)
    if earlier_attempt:  # one that failed before its first save: an empty checkpoints folder
        (tmp_path / "run" / train.CHECKPOINT_DIR).mkdir(parents=True)
    missing = tmp_path / "ViT-B_16.npz"
    with pytest.raises(FileNotFoundError, match=r"Checkpoint not found: .*ViT-B_16\.npz"):
        train.train_and_evaluate(tiny_config(pretrained=str(missing)), str(tmp_path / "run"))


def test_phase_order_is_checked(tmp_path):
    config = default_config.get_config()
    config.phases = ("finetune", "pretrain")
    with pytest.raises(ValueError, match="'pretrain', which does not run before it"):
        train.train_phases(config, str(tmp_path))


def test_configs_are_locked():  # the command line's side: tests/test_main.py
    with pytest.raises(AttributeError, match="batchsize"):
        common.get_config().batchsize = 3
    with pytest.raises(AttributeError, match="batchsize"):
        default_config.get_config().finetune.batchsize = 3


def test_default_config_is_valid():
    config = default_config.get_config()
    for name in config.phases:
        run_config.validate_config(config[name], 1, 1)
    assert config.finetune.image_size == 2 * config.pretrain.image_size
    assert config.finetune.pretrained == "phase:pretrain"
