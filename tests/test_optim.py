"""Tests for vit_jax.optim: schedule values by formula, optimizer updates by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import optim


def _expected_lr(step, base, total, warmup, decay, end):
    t = step + 1
    progress = min(max((t - warmup) / (total - warmup), 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return (end + (base - end) * shape) * (min(1.0, t / warmup) if warmup else 1.0)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_formula_at_chosen_steps(decay, warmup):
    base, total, end = 0.03, 100, 1e-5 if decay == "linear" else 0.0
    schedule = optim.learning_rate_schedule(
        base_lr=base, total_steps=total, warmup_steps=warmup, decay_type=decay, linear_end=end
    )
    for step in (0, 1, 4, 9, 10, 37, 50, 98, 99):
        assert float(schedule(step)) == pytest.approx(
            _expected_lr(step, base, total, warmup, decay, end), rel=1e-6, abs=1e-9
        ), step


def test_schedule_landmarks():
    schedule = optim.learning_rate_schedule(
        base_lr=1e-3, total_steps=1000, warmup_steps=100, decay_type="linear", linear_end=1e-5
    )
    assert float(schedule(0)) == pytest.approx(1e-5)  # first update: base/warmup, not 0
    assert float(schedule(99)) == pytest.approx(1e-3)  # end of warmup: the full lr
    assert float(schedule(999)) == pytest.approx(1e-5)  # last update: linear_end
    cosine = optim.learning_rate_schedule(base_lr=0.03, total_steps=500, warmup_steps=100)
    assert float(cosine(299)) == pytest.approx(0.015)  # half way through the decay
    assert float(cosine(499)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total_steps=10, warmup_steps=10), r"total_steps \(10\).*warmup_steps \(10\)"),
        (dict(total_steps=10, warmup_steps=2, base_lr=-0.1), r"base_lr must be ≥ 0.*got -0.1"),
        (dict(total_steps=10, warmup_steps=2, base_lr=float("nan")), r"finite.*got nan"),
        (dict(total_steps=10, warmup_steps=2, decay_type="step"), r"'step'.*cosine"),
    ],
)
def test_schedule_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.learning_rate_schedule(**{"base_lr": 0.1, **kwargs})


def test_logged_lr_equals_applied_lr():
    # Plain SGD without momentum: update = -lr · grad, so the applied lr is readable per step.
    schedule = optim.learning_rate_schedule(base_lr=0.5, total_steps=6, warmup_steps=2)
    tx = optim.make_optimizer("sgd", schedule, grad_clip_norm=None, momentum=0.0)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    for step in range(6):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        assert float(-updates["w"]) == pytest.approx(float(schedule(step))), step
        if step < 5:  # every update but the last (cosine ends at 0) moves the param
            assert float(-updates["w"]) > 0


def test_sgd_momentum_by_hand_and_accumulator_dtype_is_honoured():
    tx = optim.make_optimizer(
        "sgd", lambda _: 0.1, grad_clip_norm=None, momentum=0.9, accumulator_dtype=jnp.bfloat16
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    assert jax.tree.leaves(state)[0].dtype == jnp.bfloat16
    g = {"w": jnp.array([1.0, 2.0, 4.0])}
    u1, state = tx.update(g, state, params)
    u2, state = tx.update(g, state, params)
    np.testing.assert_allclose(u1["w"], -0.1 * g["w"], rtol=1e-2)
    np.testing.assert_allclose(u2["w"], -0.1 * 1.9 * g["w"], rtol=1e-2)


def test_clipping_scales_to_global_norm():
    tx = optim.make_optimizer("sgd", lambda _: 1.0, grad_clip_norm=1.0, momentum=0.0)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-0.8], rtol=1e-6)


def test_adamw_decays_kernels_only():
    params = {
        "Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "LayerNorm_0": {"scale": jnp.ones(2)},
        "cls": jnp.ones((1, 1, 2)),
    }
    assert optim.kernel_mask(params) == {
        "Dense_0": {"kernel": True, "bias": False},
        "LayerNorm_0": {"scale": False},
        "cls": False,
    }
    tx = optim.make_optimizer("adamw", lambda _: 0.1, grad_clip_norm=None, weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradients: only the decoupled decay moves the params, by -lr·wd·param on kernels.
    np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.05 * np.ones((2, 2)))
    for leaf in (updates["Dense_0"]["bias"], updates["LayerNorm_0"]["scale"], updates["cls"]):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_adam_first_step_by_hand():
    tx = optim.make_optimizer("adam", lambda _: 0.01, grad_clip_norm=None)
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([0.5, -2.0])}, tx.init(params), params)
    # Bias-corrected first Adam step is -lr · sign(g) (up to eps).
    np.testing.assert_allclose(updates["w"], [-0.01, 0.01], rtol=1e-5)
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("lamb", {}, r"'lamb'.*sgd"),
        ("sgd", {"weight_decay": 0.1}, "adamw"),
        ("adamw", {"weight_decay": -1.0}, "≥ 0"),
    ],
)
def test_make_optimizer_rejects_bad_choices(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(name, lambda _: 0.1, **kwargs)
