"""Input normalisation travels with the weights: the model applies its own, and a file's record
(`<file>.json`) stops it being used with another one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vit_jax import checkpoint, models, models_vit, predict, run_config, train, weights_info


def test_imagenet_normalisation_maps_the_pipelines_pixels_to_mean_std_units():
    # White (x = 1) and black (x = −1) pixels: (1 − mean)/std and (0 − mean)/std per channel.
    x = jnp.array([[[[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]]])
    got = np.asarray(models_vit.normalize_input(x, "imagenet"))
    np.testing.assert_allclose(got[0, 0, 0], [2.2489083, 2.4285715, 2.64], rtol=1e-6)
    np.testing.assert_allclose(got[0, 0, 1], [-2.117904, -2.0357144, -1.8044444], rtol=1e-6)
    assert models_vit.normalize_input(x, "inception") is x  # the original's: unchanged


def test_a_deit_model_normalises_its_input_itself():
    deit = models.get_model("DeiT-Ti_16", num_classes=3)
    assert (
        deit.input_norm == "imagenet"
        and models.get_model("ViT-Ti_16", num_classes=3).input_norm == "inception"
    )
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    params = deit.init(jax.random.PRNGKey(0), x, train=False)["params"]
    params["head"]["kernel"] = np.random.default_rng(1).normal(size=(192, 3)).astype(np.float32)
    plain = deit.clone(input_norm="inception")  # the same net fed already-normalised pixels
    want = plain.apply({"params": params}, models_vit.normalize_input(x, "imagenet"), train=False)
    got = deit.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (
        np.abs(np.asarray(got) - np.asarray(plain.apply({"params": params}, x, train=False))).max()
        > 1e-2
    )
    with pytest.raises(
        ValueError, match="Unknown input_norm='bgr'; valid values: 'inception', 'imagenet'"
    ):
        deit.clone(input_norm="bgr").init(jax.random.PRNGKey(0), x, train=False)


def _testing_file(tmp_path, input_norm=None):
    config = common.get_config()
    model = run_config.make_model(config, num_classes=10)
    state = train.create_state(config, model, run_config.make_schedule(config))
    path = tmp_path / "params.npz"
    checkpoint.save(jax.device_get(state.params), path)
    if input_norm:
        weights_info.write(path, input_norm=input_norm, model="testing", source="test")
    return path


def test_the_record_is_checked_wherever_a_model_is_built_for_the_file(tmp_path):
    path = _testing_file(tmp_path, "imagenet")
    record = json.loads((tmp_path / "params.npz.json").read_text())
    assert record["input_norm"] == "imagenet" and record["std"] == [0.229, 0.224, 0.225]
    # predict / attention
    with pytest.raises(checkpoint.CheckpointError) as error:
        predict.load_for_prediction(path, "testing")
    message = str(error.value)
    assert "trained on input_norm='imagenet' pixels" in message
    assert "model 'testing' has input_norm='inception'" in message
    model, _, _ = predict.load_for_prediction(path, "testing", input_norm="imagenet")
    assert model.input_norm == "imagenet"
    # fine-tuning (before any data is read)
    config = common.get_config()
    config.pretrained = str(tmp_path)  # the workdir resolves to its params.npz
    with pytest.raises(checkpoint.CheckpointError, match=r"--config\.model\.input_norm=imagenet"):
        train.create_state(config, run_config.make_model(config, num_classes=10), None)
    config.model.input_norm = "imagenet"
    model = run_config.make_model(config, num_classes=10)
    train.create_state(config, model, run_config.make_schedule(config))


def test_a_file_without_a_record_or_with_the_same_norm_is_not_refused(tmp_path):
    path = _testing_file(tmp_path)
    weights_info.check_input_norm(path, "imagenet", "model 'DeiT-S_16'")  # no record: no check
    weights_info.write(path, input_norm="inception")
    weights_info.check_input_norm(path, "inception", "model 'ViT-S_16'")
    with pytest.raises(ValueError, match="Unknown input_norm='rgb'"):
        weights_info.write(path, input_norm="rgb")


def test_a_run_of_a_deit_model_records_its_norm_beside_its_params(tmp_path):
    config = common.get_config()
    config.model = common.model_config("testing", patches={"size": (4, 4)}, input_norm="imagenet")
    config.update(image_size=8, batch_size=16, total_steps=1, warmup_steps=0, log_every=1)
    train.train_and_evaluate(config, str(tmp_path))
    assert weights_info.read(tmp_path / "params.npz")["input_norm"] == "imagenet"
    plain = tmp_path / "plain"
    config.model.input_norm = "inception"
    train.train_and_evaluate(config, str(plain))
    assert weights_info.read(plain / "params.npz") is None  # the original's: nothing to record
