"""DeiT distillation: the losses against hand-computed values, cutmix, the teacher as a step
input, the config and teacher-checkpoint checks, and a teacher → student run on the digits."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import deit as deit_config
from vit_jax import checkpoint, run_config, steps, train
from vit_jax.tasks import classification, distillation

LN3, LN4 = math.log(3.0), math.log(4.0)
# The digits run below measured 0.608 (teacher, 150 steps) and 0.258 (student of width 10, 150
# steps; chance is 0.1) on a 2-core AMD EPYC (Zen 4) CPU.
FLOOR_TEACHER, FLOOR_STUDENT = 0.5, 0.2


def _one_hot(index, n=2):
    return jnp.eye(n)[jnp.asarray(index)]


# ---------------------------------------------------------------------------------- losses


def test_hard_distillation_is_half_label_and_half_teacher_argmax_cross_entropy():
    # softmax([0, ln 3]) = (1/4, 3/4): CE against class 0 is ln 4, against class 1 ln(4/3).
    cls_logits = jnp.array([[0.0, LN3]])
    dist_logits = jnp.array([[LN3, 0.0]])  # (3/4, 1/4)
    teacher = jnp.array([[2.0, 1.0]])  # argmax 0
    base = classification.compute_loss(cls_logits, _one_hot([0]), "softmax_xent")
    np.testing.assert_allclose(base, [LN4], rtol=1e-6)
    loss = distillation.hard_distillation_loss(base, dist_logits, teacher)
    np.testing.assert_allclose(loss, [0.5 * LN4 + 0.5 * math.log(4 / 3)], rtol=1e-6)
    # The teacher's scale does not matter, only its argmax.
    np.testing.assert_allclose(
        distillation.hard_distillation_loss(base, dist_logits, 100 * teacher), loss, rtol=1e-6
    )


def test_soft_distillation_is_the_tau_squared_scaled_kl_at_temperature_tau():
    base = jnp.array([LN4])
    # At τ = 2 these are p_teacher = (1/4, 3/4), p_student = (3/4, 1/4):
    # KL = 1/4·ln(1/3) + 3/4·ln 3 = ½·ln 3, scaled by τ² = 4.
    teacher = jnp.array([[0.0, 2 * LN3]])
    dist_logits = jnp.array([[2 * LN3, 0.0]])
    loss = distillation.soft_distillation_loss(base, dist_logits, teacher, alpha=0.1, tau=2.0)
    np.testing.assert_allclose(loss, [0.9 * LN4 + 0.1 * 4 * 0.5 * LN3], rtol=1e-6)
    same = distillation.soft_distillation_loss(base, teacher, teacher, alpha=0.5, tau=3.0)
    np.testing.assert_allclose(same, [0.5 * LN4], rtol=1e-6)  # KL(p ‖ p) = 0


class _FixedTeacher:
    """Stands in for the teacher module: fixed logits, whatever the params."""

    def __init__(self, logits):
        self.logits = logits

    def apply(self, variables, images, *, train):
        assert not train and variables["params"] == "teacher-params"
        return jnp.broadcast_to(self.logits, (images.shape[0], self.logits.shape[-1]))


@pytest.mark.parametrize("distilled", [True, False])
def test_the_task_loss_smooths_the_label_term_only_and_feeds_a_plain_head_both(tmp_path, distilled):
    config = _distill_config(label_smoothing=0.2)
    config.distill.teacher_checkpoint = str(_save_teacher(tmp_path, num_classes=2)[0])
    task = distillation.Distillation(config, _info(num_classes=2))
    task.teacher = _FixedTeacher(jnp.array([[2.0, 1.0]]))  # argmax 0
    cls_logits, dist_logits = jnp.array([[0.0, LN3]]), jnp.array([[LN3, 0.0]])

    def apply_fn(variables, images, *, train, rngs):
        assert train and variables["params"] == "student-params"
        return (cls_logits, dist_logits) if distilled else cls_logits

    batch = {"image": jnp.zeros((1, 8, 8, 3)), "label": _one_hot([0])}
    loss = task.train_loss(
        apply_fn, "student-params", batch, jax.random.PRNGKey(0), "teacher-params"
    )
    # The label term with targets (0.9, 0.1): 0.9·ln 4 + 0.1·ln(4/3); the teacher term unsmoothed
    # against class 0: ln(4/3) on the distillation head, ln 4 on a plain model's one head.
    label_term = 0.9 * LN4 + 0.1 * math.log(4 / 3)
    teacher_term = math.log(4 / 3) if distilled else LN4
    np.testing.assert_allclose(loss, 0.5 * label_term + 0.5 * teacher_term, rtol=1e-6)


# ---------------------------------------------------------------------------------- cutmix


def test_cutmix_pastes_one_box_of_the_partner_and_weights_labels_by_the_kept_area():
    n = 4
    images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, 16, 16, 3))
    labels = jnp.eye(n)
    pasted = []
    for seed in range(6):
        mixed, mixed_labels = classification.cutmix(images, labels, jax.random.PRNGKey(seed), 1.0)
        mixed = np.asarray(mixed)
        for i in range(n):
            partner = n - 1 - i
            from_partner = mixed[i, :, :, 0] == partner
            assert np.all(from_partner | (mixed[i, :, :, 0] == i))  # nothing else is pasted
            rows, cols = np.nonzero(from_partner)
            if i != partner and rows.size:  # a rectangle: its bounding box is all partner
                assert from_partner[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            share = from_partner.mean() if i != partner else 0.0
            np.testing.assert_allclose(mixed_labels[i, partner], share, atol=1e-6)
            np.testing.assert_allclose(mixed_labels[i].sum(), 1.0, rtol=1e-6)
        pasted.append(float(np.mean(mixed[0, :, :, 0] == n - 1)))
    assert 0.05 < max(pasted) < 1.0  # a real box in some draws, never the whole image


def test_with_mixup_and_cutmix_each_batch_gets_one_of_them():
    config = _distill_config(mixup_alpha=0.8, cutmix_alpha=1.0)
    task = classification.Classification(config, _info())
    images = jnp.broadcast_to(jnp.arange(4, dtype=jnp.float32)[:, None, None, None], (4, 8, 8, 3))
    kinds = set()
    for seed in range(12):
        mixed, _ = task.augment(images, jnp.eye(4), jax.random.PRNGKey(seed))
        values = np.unique(np.asarray(mixed)[0])
        if set(values) <= {0.0, 3.0}:
            kinds.add("cutmix")  # pixels of the image or of its partner
        else:
            assert len(values) == 1  # one blend λ·0 + (1-λ)·3 everywhere
            kinds.add("mixup")
    assert kinds == {"cutmix", "mixup"}


# ---------------------------------------------------------------------------------- config


def _info(num_classes=10):
    return type("Info", (), {"num_classes": num_classes, "class_names": None})()


def _distill_config(**overrides):
    config = common.get_config()
    config.model = common.model_config(
        "testing", patches={"size": (4, 4)}, transformer={"dropout_rate": 0.0}, distilled=True
    )
    config.update(image_size=8, batch_size=16, total_steps=3, warmup_steps=1, log_every=1)
    config.task = "distillation"
    config.distill.teacher_model = "testing"
    config.distill.teacher_checkpoint = "/nonexistent/teacher.npz"
    config.distill.teacher_image_size = 16  # the zoo's testing model has 16 px patches
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distill.teacher_model": ""}, "needs a teacher: set --config.distill.teacher_model"),
        ({"distill.teacher_checkpoint": ""}, "set --config.distill.teacher_checkpoint"),
        ({"distill.teacher_model": "ViT-B_61"}, "ViT-B_16"),  # close names listed
        ({"distill.type": "medium"}, "Unknown distill.type='medium'; valid values: hard, soft"),
        ({"distill.alpha": 1.5}, "distill.alpha must be in [0, 1]"),
        ({"distill.tau": 0.0}, "distill.tau must be > 0"),
        ({"loss": "sigmoid_xent"}, "Set --config.loss=softmax_xent"),
        (
            {"task": "classification", "model.distilled": False},
            "set --config.task=distillation, or unset them",
        ),
    ],
)
def test_bad_distillation_options_fail_before_any_work(overrides, message):
    config = _distill_config(**overrides)
    with pytest.raises(ValueError) as error:
        run_config.validate_config(config, 1, 1)
    assert message in str(error.value)


def test_the_deit_recipe_is_the_papers():
    plain = deit_config.get_config("DeiT-S_16")
    assert plain.task == "classification" and plain.dataset == "imagenet2012"
    assert plain.base_lr == pytest.approx(1e-3)  # 5e-4 · 1024 / 512
    assert (plain.batch_size, plain.weight_decay, plain.label_smoothing) == (1024, 0.05, 0.1)
    assert (plain.mixup_alpha, plain.cutmix_alpha, plain.drop_path_rate) == (0.8, 1.0, 0.1)
    assert plain.total_steps == 300 * 1252 and plain.warmup_steps == 5 * 1252
    assert plain.model.activation == "gelu" and plain.eval_crop == "resize_small_crop"
    run_config.validate_config(plain, 1, 1)
    distilled = deit_config.get_config("DeiT-Ti_16-dist,cifar10")
    assert distilled.task == "distillation" and distilled.distill.type == "hard"
    assert distilled.total_steps == 300 * 49
    with pytest.raises(ValueError, match="needs a teacher"):
        run_config.validate_config(distilled, 1, 1)
    distilled.distill.teacher_model = "ViT-B_16"
    distilled.distill.teacher_checkpoint = "/teacher"
    run_config.validate_config(distilled, 1, 1)
    with pytest.raises(ValueError, match="No DeiT preset for dataset 'mnist'"):
        deit_config.get_config("DeiT-S_16,mnist")


# ---------------------------------------------------------------------------------- teacher


def _save_teacher(tmp_path, name="testing", num_classes=10, image_size=16, **model_overrides):
    config = common.get_config()
    config.model = common.model_config(name, **model_overrides)
    config.image_size = image_size
    model = run_config.make_model(config, num_classes=num_classes)
    state = train.create_state(config, model, run_config.make_schedule(config))
    params = jax.device_get(state.params)
    head = params["head"]["kernel"]  # zero-initialised: a teacher that has learnt something
    params["head"]["kernel"] = np.random.default_rng(0).normal(size=head.shape).astype(head.dtype)
    path = tmp_path / f"{name}-{num_classes}-{image_size}.npz"
    checkpoint.save(params, path)
    return path, params


def test_the_teacher_is_fitted_to_its_checkpoint_and_a_wrong_one_fails_naming_it(tmp_path):
    path, params = _save_teacher(tmp_path, image_size=32)
    config = _distill_config()
    config.distill.teacher_checkpoint = str(path)
    config.distill.teacher_image_size = 0  # the checkpoint's own: 32 px (a 2×2 grid of 16 px)
    model, loaded, size = distillation.load_teacher(config, num_classes=10)
    assert size == 32 and model.num_classes == 10
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    config.distill.teacher_image_size = 16  # resampled, as predict does
    assert distillation.load_teacher(config, num_classes=10)[2] == 16
    with pytest.raises(checkpoint.CheckpointError) as error:
        distillation.load_teacher(config, num_classes=7)
    assert "it predicts 10 classes, the dataset has 7" in str(error.value)
    assert f"distill.teacher_checkpoint={str(path)!r}" in str(error.value)
    config.distill.teacher_model = "testing-unpooled"
    with pytest.raises(ValueError, match="prediction needs one of token, gap"):
        distillation.load_teacher(config, num_classes=10)
    config.distill.teacher_model = "ViT-Ti_16"
    with pytest.raises(checkpoint.CheckpointError, match="does not fit model 'ViT-Ti_16'"):
        distillation.load_teacher(config, num_classes=10)
    config.distill.teacher_model = "testing"
    config.distill.teacher_checkpoint = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="Cannot use the teacher"):
        distillation.load_teacher(config, num_classes=10)


def test_a_non_zoo_teacher_takes_json_overrides(tmp_path):
    path, _ = _save_teacher(tmp_path, image_size=8, patches={"size": (4, 4)})
    config = _distill_config(**{"distill.teacher_overrides": '{"patches": {"size": [4, 4]}}'})
    config.distill.teacher_checkpoint = str(path)
    config.distill.teacher_image_size = 0
    model, _, size = distillation.load_teacher(config, num_classes=10)
    assert size == 8 and tuple(model.patches.size) == (4, 4)
    config.distill.teacher_overrides = "[4, 4]"
    with pytest.raises(ValueError, match="must be a JSON object of model overrides"):
        run_config.validate_config(config, 1, 1)


def test_the_teacher_params_are_an_argument_of_the_step_not_a_constant(tmp_path, monkeypatch):
    """One compiled step serves two teachers, and the student's update follows the teacher."""
    traces = []
    original = distillation.Distillation.train_loss

    def counted(self, *args):
        traces.append(1)  # runs when jax traces the step, not per call
        return original(self, *args)

    monkeypatch.setattr(distillation.Distillation, "train_loss", counted)
    config = _distill_config(optimizer="sgd", momentum=0.0, grad_clip_norm=0.0, warmup_steps=0)
    config.distill.teacher_checkpoint = str(_save_teacher(tmp_path)[0])
    task = distillation.Distillation(config, _info())
    model = run_config.make_model(config, **task.head())
    schedule = run_config.make_schedule(config)
    host_state = train.create_state(config, model, schedule)
    p_step = steps.make_train_step(task, schedule, 1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (8, 2, 8, 8, 3)).astype(np.float32),
        "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, (8, 2))],
    }
    key = steps.replicate(jax.random.PRNGKey(0))
    teacher = task.step_inputs()
    flipped = jax.tree.map(lambda x: -x, teacher)  # another teacher: other argmaxes
    grad_norms = []
    for params in (teacher, flipped, teacher):
        state = steps.replicate(host_state)  # the step donates its state's buffers
        _, metrics = p_step(state, batch, key, steps.replicate(params))
        grad_norms.append(float(metrics["grad_norm"][0]))
    assert len(traces) == 1  # traced (and compiled) once for both teachers
    # The student's logits start at zero (zero head), so its loss is ln 10 whatever the teacher;
    # its gradient follows the teacher's targets.
    assert grad_norms[0] == grad_norms[2] and abs(grad_norms[0] - grad_norms[1]) > 1e-3


# ---------------------------------------------------------------------------------- end to end


def test_a_student_distils_from_a_teacher_trained_first_on_the_digits(tmp_path):
    """Teacher (trained here) → distilled student through `train_and_evaluate`: the teacher is
    read from its workdir at its own resolution (16 px) while the student trains at 8 px."""
    teacher = common.get_config()
    teacher.model = common.model_config("testing", hidden_size=32, transformer={"mlp_dim": 64})
    teacher.update(image_size=16, batch_size=64, optimizer="adamw", base_lr=3e-3)
    teacher.update(total_steps=150, warmup_steps=10, log_every=50)
    _, teacher_metrics = train.train_and_evaluate(teacher, str(tmp_path / "teacher"))
    student = _distill_config(batch_size=64, optimizer="adamw", base_lr=3e-3, total_steps=150)
    student.update(warmup_steps=10, log_every=50, mixup_alpha=0.2)
    student.distill.teacher_checkpoint = str(tmp_path / "teacher")
    student.distill.teacher_image_size = 0  # its own: 16 px
    student.distill.teacher_overrides = '{"hidden_size": 32, "transformer": {"mlp_dim": 64}}'
    _, metrics = train.train_and_evaluate(student, str(tmp_path / "student"))
    assert teacher_metrics["accuracy"] > FLOOR_TEACHER, teacher_metrics
    assert metrics["accuracy"] > FLOOR_STUDENT and metrics["count"] == 360, metrics
    info = json.loads((tmp_path / "student" / "task.json").read_text())
    assert info["task"] == "classification"  # predict reads it as any classifier
