"""Few-shot linear evaluation: the closed-form ridge, the shots drawn, features of every example.

The ridge is checked by hand on a 1-D case and against scikit-learn's Ridge on whitened
features; the evaluator on the 8 fake CPU devices (every real example once, padding dropped)
and from the command line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_train import DIGITS_TEST
from vit_jax import checkpoint, fewshot, models


def test_ridge_by_hand_in_one_dimension():
    # Whitened train features are -1 and +1; w = x^T t / (2 + λ) = (-2, 2) / (2 + λ) per class,
    # so a test feature below the train mean scores class 0, one above it class 1.
    x, y = np.array([[-1.0], [1.0]]), np.array([0, 1])
    x_test = np.array([[-0.5], [3.0], [0.2]])
    assert fewshot.ridge_accuracy(x, y, x_test, np.array([0, 1, 1]), 2, l2_reg=5.0) == 1.0
    assert fewshot.ridge_accuracy(x, y, x_test, np.array([1, 1, 1]), 2) == pytest.approx(2 / 3)


def test_ridge_equals_scikit_learns_on_whitened_features():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, (4, 16))
    y, y_test = rng.integers(0, 4, 40), rng.integers(0, 4, 200)
    x = centres[y] + rng.normal(0, 3, (40, 16))
    x_test = centres[y_test] + rng.normal(0, 3, (200, 16))
    for l2 in (0.1, 10.0, 1024.0):
        ours = fewshot.ridge_accuracy(x, y, x_test, y_test, 4, l2_reg=l2)
        mean, std = x.mean(0), x.std(0) + fewshot.STD_EPS
        ridge = Ridge(alpha=l2, fit_intercept=False).fit((x - mean) / std, 2 * np.eye(4)[y] - 1)
        predicted = ridge.predict((x_test - mean) / std).argmax(1)
        assert ours == pytest.approx(np.mean(predicted == y_test))
        assert 0.4 < ours < 1.0  # well above chance (0.25), not trivially separable


def test_shots_are_per_class_seeded_and_refused_when_a_class_is_short():
    labels = np.repeat(np.arange(3), [5, 7, 4])
    picked = fewshot.sample_shots(labels, 4, 3, seed=1)
    assert sorted(np.bincount(labels[picked])) == [4, 4, 4] and len(set(picked)) == 12
    np.testing.assert_array_equal(picked, fewshot.sample_shots(labels, 4, 3, seed=1))
    assert not np.array_equal(picked, fewshot.sample_shots(labels, 4, 3, seed=2))
    with pytest.raises(ValueError, match="needs 5 training examples of every class, but class 2"):
        fewshot.sample_shots(labels, 5, 3, seed=0)


def _digits_encoder(tmp_path):
    """A random-init ViT encoder saved headless, as a pretraining run exports it."""
    import jax
    import jax.numpy as jnp

    model = models.get_model("testing", num_classes=0, hidden_size=32, patches={"size": (4, 4)})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
    path = tmp_path / "encoder.npz"
    checkpoint.save(params, path)
    return path


def test_command_line_counts_every_test_image_and_prints_each_k(tmp_path, capsys):
    path = _digits_encoder(tmp_path)
    base = ["--checkpoint", str(path), "--model", "testing"]
    base += ["--overrides", json.dumps({"hidden_size": 32, "patches": {"size": [4, 4]}})]
    argv = [*base, "--shots", "1,5", "--seeds", "2"]
    assert fewshot.main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"1shot", "1shot_std", "5shot", "5shot_std"}
    # Random features of digits are informative: far above chance (0.1) already at 5 shots;
    # accuracies are multiples of 1/360 (the whole test split, once).
    assert results["5shot"] > 0.2
    for k in ("1shot", "5shot"):
        assert results[k] * DIGITS_TEST * 2 == pytest.approx(round(results[k] * DIGITS_TEST * 2))
    assert fewshot.main(argv) == 0
    assert " 5-shot accuracy " in capsys.readouterr().out
    assert fewshot.main([*base, "--shots", "1,x"]) == 2
    assert "--shots must be comma-separated integers" in capsys.readouterr().err
    assert fewshot.main([*base, "--shots", "200"]) == 2
    assert "needs 200 training examples of every class" in capsys.readouterr().err


def test_the_evaluator_reads_the_runs_splits_and_skips_a_split_too_small(caplog):
    import jax
    import jax.numpy as jnp

    from tests.test_ssl import _config
    from vit_jax import run_config, run_data, steps

    config = _config("classification", loss="softmax_xent", train_split="train[:100]")
    config.fewshot.update(every=10, shots=(1, 25))
    evaluator = run_data.fewshot_evaluator(config)
    assert evaluator.train_batches.num_examples == 100  # the run's train_split
    assert evaluator.test_batches.num_examples == DIGITS_TEST  # the run's test_split
    model = run_config.make_model(config, num_classes=0)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
    with caplog.at_level("WARNING"):
        assert evaluator(steps.replicate(params["params"])) == {}
    assert "Few-shot evaluation skipped: Few-shot evaluation needs 25 training examples" in (
        caplog.text
    )
    config.fewshot.dataset = "sklearn_digits"
    with pytest.raises(ValueError, match=r"needs fewshot\.train_split and fewshot\.test_split"):
        run_config.validate_config(config, 8, 8)  # before any work
