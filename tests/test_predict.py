"""Tests of vit_jax.predict: checkpoint → model, preprocessing, batching, labels, command line.

The real photos come from ../shared/data (outside the package); tests that need them skip,
saying why, where that folder is absent. No class is asserted for them: the checkpoints here are
random, and the tests compare numbers with `model.apply` instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._commands import png_libpng_warns_about, subprocess_env
from vit_jax import checkpoint, checkpoint_geometry, input_pipeline, models, predict, tasks

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
PHOTOS = sorted((DATA / "images").glob("*")) if (DATA / "images").is_dir() else []
IMAGENET_LABELS = DATA / "labels" / "ilsvrc2012_wordnet_lemmas.txt"
needs_photos = pytest.mark.skipif(
    len(PHOTOS) < 5, reason=f"test photos not found in {DATA / 'images'} (shared test data)"
)
needs_labels = pytest.mark.skipif(
    not IMAGENET_LABELS.is_file(), reason=f"{IMAGENET_LABELS} not found (shared test data)"
)
NUM_CLASSES = 7


def random_params(model, image_size: int, seed: int = 0) -> dict:
    """Random, non-zero params for every leaf (the head's zero init included); no compilation."""
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def apply(model, params, images) -> np.ndarray:
    """The reference: `model.apply` in Python (jitted as a whole, to keep the test fast)."""
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    return np.asarray(forward(params, images))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 'testing' ViT (7 classes) trained 'at' 32 px, written with checkpoint.save."""
    model = models.get_model("testing", num_classes=NUM_CLASSES)
    params = random_params(model, 32)
    path = tmp_path_factory.mktemp("ckpt") / "testing_7.npz"
    checkpoint.save(params, path)
    return str(path), model, params


def photos(n: int) -> list[str]:
    return [str(p) for p in PHOTOS[:n]]


def preprocessed(paths: list[str], size: int) -> np.ndarray:
    return np.stack([input_pipeline.eval_image(p, size) for p in paths])


# ----------------------------------------------------------------------------------------------
# Preprocessing is the evaluation pipeline's.


@needs_photos
@pytest.mark.parametrize("eval_crop", input_pipeline.EVAL_CROPS)
def test_eval_image_equals_the_eval_iterators_images(tmp_path, eval_crop):
    root = tmp_path / "folder"
    layout = {"a": PHOTOS[:2], "b": PHOTOS[2:3]}
    for split in ("train", "test"):
        for name, files in layout.items():
            (root / split / name).mkdir(parents=True)
            for f in files:
                shutil.copy(f, root / split / name / f.name)
    batches = input_pipeline.get_eval_iterator(
        f"folder:{root}",
        "test",
        image_size=24,
        global_batch_size=4,
        local_device_count=1,
        eval_crop=eval_crop,
    )
    (batch,) = list(batches)
    from_pipeline = batch["image"][0][batch["mask"][0] == 1]
    ordered = [root / "test" / n / f.name for n, files in layout.items() for f in sorted(files)]
    single = np.stack([input_pipeline.eval_image(str(p), 24, eval_crop) for p in ordered])
    assert single.shape == (3, 24, 24, 3) and single.dtype == np.float32
    assert single.min() >= -1.0 and single.max() <= 1.0
    np.testing.assert_array_equal(single, from_pipeline)


# ----------------------------------------------------------------------------------------------
# Loading and the Python API.


@needs_photos
def test_load_for_prediction_reproduces_model_apply(saved):
    path, reference, params = saved
    model, loaded, image_size = predict.load_for_prediction(path, "testing")
    assert image_size == 32  # from the 2×2 position grid (+ class row) and 16 px patches
    assert model.num_classes == NUM_CLASSES
    images = preprocessed(photos(3), 32)
    logits = predict.predict(model, loaded, images, batch_size=2)
    expected = apply(reference, params, images)
    assert logits.shape == (3, NUM_CLASSES)
    assert np.ptp(expected) > 0.1  # random params: the logits differ between classes
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


@needs_photos
def test_command_line_json_matches_python_logits(saved):
    path, reference, params = saved
    warned = png_libpng_warns_about()  # a photo whose decoding makes libpng warn
    images = [*photos(1), str(warned)] if warned is not None else photos(2)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "vit_jax.predict", f"--checkpoint={path}", "--model=testing"),
            *("--json", "--top_k=3", *images),
        ],
        cwd=REPO,
        env=subprocess_env(devices=8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # TensorFlow's native start-up notices and run-time warnings (the PNG's) stay off the
    # console (--verbose shows them): with --json nothing but the JSON is printed.
    assert done.stderr == "", done.stderr
    results = json.loads(done.stdout)
    probs = softmax(apply(reference, params, preprocessed(images, 32)).astype(np.float64))
    assert [r["image"] for r in results] == images
    for result, row in zip(results, probs, strict=True):
        expected_order = np.argsort(-row, kind="stable")[:3]
        assert [e["class"] for e in result["top_k"]] == expected_order.tolist()
        np.testing.assert_allclose(
            [e["prob"] for e in result["top_k"]], row[expected_order], atol=1e-6
        )
        assert all(e["label"] is None for e in result["top_k"])


@needs_photos
def test_resolution_from_the_position_table_and_a_workdir_path(tmp_path):
    """Saved at 16 px (1×1 grid + class row) → predicts at 16 px, from a training workdir."""
    model = models.get_model("testing", num_classes=NUM_CLASSES)
    params = random_params(model, 16, seed=1)
    checkpoint.save(params, tmp_path / "params.npz")
    loaded_model, loaded, image_size = predict.load_for_prediction(tmp_path, "testing")
    assert image_size == 16
    assert loaded["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 2, 10)
    images = preprocessed(photos(2), 16)
    np.testing.assert_allclose(
        predict.predict(loaded_model, loaded, images),
        apply(model, params, images),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("name", "overrides", "trained_at", "expected"),
    [
        ("testing", {}, 16, 16),  # 1×1 grid + class row, patch 16
        ("testing", {}, 48, 48),  # 3×3 grid + class row
        ("testing", {"classifier": "gap", "patches": {"size": (8, 8)}}, 24, 24),  # no class row
        ("R+ViT-Ti_16", {}, 64, 64),  # hybrid: grid 2 × patch 8 × stem stride 4
        ("Mixer-B_16", {}, 32, 32),  # Mixer: token-mixing width 4 = 2×2 patches
    ],
)
def test_infer_image_size(name, overrides, trained_at, expected):
    model = models.get_model(name, num_classes=3, **overrides)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
        jax.ShapeDtypeStruct((1, trained_at, trained_at, 3), jnp.float32),
    )["params"]
    assert checkpoint_geometry.infer_image_size(shapes, model) == expected


def test_head_and_pre_logits_sizes_come_from_the_checkpoint(tmp_path):
    trained = models.get_model("testing", num_classes=5, representation_size=6)
    checkpoint.save(random_params(trained, 16), tmp_path / "with_pre_logits.npz")
    model, params, image_size = predict.load_for_prediction(
        tmp_path / "with_pre_logits.npz", "testing"
    )
    assert (model.num_classes, model.representation_size, image_size) == (5, 6, 16)
    assert params["pre_logits"]["kernel"].shape == (10, 6)


def test_non_square_position_table_needs_an_image_size():
    model = models.get_model("testing", num_classes=3, classifier="gap")
    shapes = {"Transformer": {"posembed_input": {"pos_embedding": np.zeros((1, 6, 10))}}}
    with pytest.raises(checkpoint.CheckpointError, match=r"6 grid tokens.*--image_size"):
        checkpoint_geometry.infer_image_size(shapes, model)


def test_image_size_override_resamples_the_position_table(saved):
    path, _, params = saved
    model, loaded, image_size = predict.load_for_prediction(path, "testing", image_size=64)
    assert image_size == 64
    table = loaded["Transformer"]["posembed_input"]["pos_embedding"]
    assert table.shape == (1, 17, 10)  # 4×4 grid + class row
    np.testing.assert_array_equal(
        table[:, :1], params["Transformer"]["posembed_input"]["pos_embedding"][:, :1]
    )
    logits = predict.predict(model, loaded, np.zeros((1, 64, 64, 3), np.float32))
    assert logits.shape == (1, NUM_CLASSES) and np.isfinite(logits).all()


def test_workdir_resolution(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "params.npz").write_bytes(b"x")
    assert predict.resolve_checkpoint(single) == str(single / "params.npz")

    phases = tmp_path / "phases"
    for i, name in enumerate(("finetune", "pretrain")):
        (phases / name).mkdir(parents=True)
        (phases / name / "params.npz").write_bytes(b"x")
        os.utime(phases / name / "params.npz", (1000 - 900 * i, 1000 - 900 * i))
    (phases / "logs").mkdir()
    # finetune's params were written last (pretrain ran first).
    assert predict.resolve_checkpoint(phases) == str(phases / "finetune" / "params.npz")

    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no params\.npz .*holds: logs"):
        predict.resolve_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        predict.load_params(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------------------------
# Batching.


@needs_photos
def test_batches_match_one_by_one_and_compile_once_per_shape(saved):
    path, _, _ = saved
    model, params, image_size = predict.load_for_prediction(path, "testing")
    images = preprocessed(photos(5), image_size)

    batched = predict.Predictor(model, params, batch_size=2)
    logits = batched(images)  # batches of 2, 2 and 1 + 1 padding
    assert batched.traces == 1
    batched(images[:3])
    assert batched.traces == 1  # same batch shape: no new compilation

    single = predict.Predictor(model, params, batch_size=1)
    one_by_one = np.concatenate([single(image[None]) for image in images])
    assert single.traces == 1
    np.testing.assert_allclose(logits, one_by_one, atol=1e-5, rtol=0)

    results = predict.classify(batched, photos(5), image_size=image_size, k=3)
    assert batched.traces == 1
    for result, row in zip(results, softmax(one_by_one.astype(np.float64)), strict=True):
        order = np.argsort(-row, kind="stable")[:3]
        assert [e["class"] for e in result["top_k"]] == order.tolist()
        np.testing.assert_allclose([e["prob"] for e in result["top_k"]], row[order], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Labels.


@needs_photos
def test_labels_are_printed(saved, tmp_path, capsys):
    path, reference, params = saved
    names = [f"class number {i}" for i in range(NUM_CLASSES)]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(names) + "\n")
    image = photos(1)[0]
    code = predict.main(
        [f"--checkpoint={path}", "--model=testing", f"--labels={labels}", "--top_k=2", image]
    )
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    probs = softmax(apply(reference, params, preprocessed([image], 32)))[0]
    first, second = np.argsort(-probs, kind="stable")[:2]
    assert out[0] == image
    assert out[1] == f"  {probs[first]:.4f}  {first:>5d}  class number {first}"
    assert out[2] == f"  {probs[second]:.4f}  {second:>5d}  class number {second}"
    assert len(out) == 3


@needs_photos
@needs_labels
def test_labels_with_the_wrong_line_count_fail_before_any_work(saved, capsys, monkeypatch):
    path, _, _ = saved

    def no_work(*args, **kwargs):
        raise AssertionError("a Predictor was built although the labels file is wrong")

    monkeypatch.setattr(predict, "Predictor", no_work)
    code = predict.main(
        [f"--checkpoint={path}", "--model=testing", f"--labels={IMAGENET_LABELS}", *photos(1)]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "has 1000 lines, but the checkpoint's head has 7 classes" in captured.err
    assert predict.IMAGENET1K_LABELS_URL in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_probabilities_and_top_k_by_hand():
    logits = np.array([[0.0, np.log(3.0), 0.0]])
    np.testing.assert_allclose(predict.probabilities(logits), [[0.2, 0.6, 0.2]])
    np.testing.assert_allclose(predict.probabilities(logits, sigmoid=True), [[0.5, 0.75, 0.5]])
    indices, values = predict.top_k(np.array([[0.2, 0.6, 0.2]]), 5)  # k > classes: all 3
    assert indices.tolist() == [[1, 0, 2]]  # tie between 0 and 2: lower index first
    np.testing.assert_allclose(values, [[0.6, 0.2, 0.2]])


def test_read_labels(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("tench\ngoldfish\ngreat white shark\n")
    assert predict.read_labels(labels, 3) == ["tench", "goldfish", "great white shark"]
    with pytest.raises(ValueError, match=r"has 3 lines, but the checkpoint's head has 4 classes"):
        predict.read_labels(labels, 4)
    with pytest.raises(FileNotFoundError, match="Cannot read labels file"):
        predict.read_labels(tmp_path / "missing.txt", 3)


# ----------------------------------------------------------------------------------------------
# Bad inputs.


@needs_photos
def test_bad_images_are_reported_and_the_others_predicted(saved, tmp_path, capsys):
    path, _, _ = saved
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text, not a JPEG")
    missing = str(tmp_path / "missing.png")
    good = photos(2)
    args = [f"--checkpoint={path}", "--model=testing", "--batch_size=2", "--top_k=1"]
    images = [good[0], missing, str(not_an_image), good[1]]

    code = predict.main([*args, *images])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert errors == [
        f"error: cannot read image {missing!r}: no such file",
        f"error: cannot read image {str(not_an_image)!r}: not a readable image "
        f"(UnidentifiedImageError: cannot identify image file {str(not_an_image)!r})",
    ]
    printed = [line for line in captured.out.splitlines() if not line.startswith(" ")]
    assert printed == good

    code = predict.main([*args, "--json", *images])
    results = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [r["image"] for r in results] == images
    assert [("error" in r, len(r.get("top_k", []))) for r in results] == [
        (False, 1),
        (True, 0),
        (True, 0),
        (False, 1),
    ]


def test_checkpoint_errors_are_one_clear_line(saved, tmp_path, capsys):
    path, _, _ = saved
    not_npz = tmp_path / "model.npz"
    not_npz.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    assert predict.main([f"--checkpoint={not_npz}", "--model=testing", "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Checkpoint") and "Git LFS pointer" in err

    headless = tmp_path / "features.npz"
    model = models.get_model("testing", num_classes=0)
    checkpoint.save(random_params(model, 16), headless)
    assert predict.main([f"--checkpoint={headless}", "--model=testing", "x.jpg"]) == 2
    assert "no classification head" in capsys.readouterr().err

    assert predict.main([f"--checkpoint={path}", "--model=ViT-S_16", "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert "does not fit model 'ViT-S_16'" in err
    assert "embedding/kernel: model expects (16, 16, 3, 384), checkpoint has (16, 16, 3, 10)" in err

    assert predict.main([f"--checkpoint={path}", "--model=ViT-B16", "x.jpg"]) == 2
    assert "Unknown model name 'ViT-B16'. Did you mean: ViT-B_16" in capsys.readouterr().err

    with pytest.raises(ValueError, match=r"classifier='unpooled'.*token, gap"):
        predict.prepare_for_prediction(checkpoint.load(path), "testing-unpooled")


def test_predict_on_a_jpeg_gives_the_eval_pipelines_logits(saved, tmp_path):
    """`load_image` + `Predictor` give exactly the logits of the eval pipeline's batch for the
    same JPEG, and both see TF's `decode_jpeg` pixels (as tfds and the original pipelines)."""
    import tensorflow as tf
    from PIL import Image

    path, _, _ = saved
    model, params, size = predict.load_for_prediction(path, "testing")
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    smooth = np.asarray(small.resize((48, 40), Image.Resampling.BICUBIC), np.float64)
    noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.fromarray(noisy).save(root / split / "a" / "photo.jpg", quality=90)
    jpeg = str(root / "test" / "a" / "photo.jpg")
    predictor = predict.Predictor(model, params, batch_size=1)
    for eval_crop in input_pipeline.EVAL_CROPS:
        (batch,) = list(
            input_pipeline.get_eval_iterator(
                f"folder:{root}",
                "test",
                image_size=size,
                global_batch_size=1,
                local_device_count=1,
                eval_crop=eval_crop,
            )
        )
        from_pipeline = predictor(batch["image"][0])
        assert np.ptp(from_pipeline) > 0.1
        image = predict.load_image(jpeg, size, eval_crop)
        np.testing.assert_array_equal(predictor(image[None]), from_pipeline, eval_crop)
        np.testing.assert_array_equal(image, batch["image"][0, 0], eval_crop)
    decoded = tf.io.decode_jpeg(tf.io.read_file(jpeg), channels=3)
    expected = (tf.image.resize(decoded, [size, size]) / 127.5 - 1.0).numpy()
    np.testing.assert_array_equal(predict.load_image(jpeg, size), expected)
    with Image.open(jpeg) as photo:  # Pillow's pixels (the old decoder) give other logits
        pillow = np.asarray(photo.convert("RGB"))
    pillow_input = (tf.image.resize(pillow, [size, size]) / 127.5 - 1.0).numpy()
    assert not np.array_equal(predictor(pillow_input[None]), predictor(expected[None]))


# ----------------------------------------------------------------------------------------------
# Non-square checkpoints: a 'testing' ViT trained at 32×48 px, i.e. a 2×3 grid of 16 px patches
# (position table: class row + 6 rows). A checkpoint does not record its grid (6 rows could be
# 1×6, 2×3, 3×2 or 6×1), so `checkpoint_grid_shape` gives it.

GRID_OVERRIDE = '{"checkpoint_grid_shape": [2, 3]}'


@pytest.fixture(scope="module")
def saved_non_square(tmp_path_factory):
    model = models.get_model("testing", num_classes=NUM_CLASSES)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
        jax.ShapeDtypeStruct((1, 32, 48, 3), jnp.float32),
    )["params"]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 7, 10)
    path = tmp_path_factory.mktemp("ckpt") / "testing_32x48.npz"
    checkpoint.save(params, path)
    return str(path), model, params


def test_non_square_checkpoint_predicts_at_a_given_size_with_its_grid(saved_non_square):
    path, model, params = saved_non_square
    loaded_model, loaded, image_size = predict.load_for_prediction(
        path, "testing", image_size=32, checkpoint_grid_shape=(2, 3)
    )
    assert image_size == 32
    # The reference: the table resampled from 2×3 to 2×2 by hand, the model run directly.
    reference = dict(params)
    reference["Transformer"] = dict(params["Transformer"])
    reference["Transformer"]["posembed_input"] = {
        "pos_embedding": checkpoint.interpolate_posembed(
            params["Transformer"]["posembed_input"]["pos_embedding"],
            5,
            True,
            old_grid_shape=(2, 3),
            new_grid_shape=(2, 2),
        )
    }
    np.testing.assert_array_equal(
        loaded["Transformer"]["posembed_input"]["pos_embedding"],
        reference["Transformer"]["posembed_input"]["pos_embedding"],
    )
    images = np.random.default_rng(4).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    logits = predict.predict(loaded_model, loaded, images)
    assert logits.shape == (3, NUM_CLASSES) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits, apply(model, reference, images), atol=1e-5, rtol=1e-5)


def test_non_square_checkpoint_errors_say_what_to_pass(saved_non_square):
    path, _, _ = saved_non_square
    # Nothing given: both the grid and the square size to predict at.
    with pytest.raises(checkpoint.CheckpointError) as err:
        predict.load_for_prediction(path, "testing")
    message = str(err.value)
    assert "6 grid tokens" in message and "2×3" in message and "3×2" in message
    assert "checkpoint_grid_shape=(rows, cols)" in message
    assert """--overrides='{"checkpoint_grid_shape": [rows, cols]}'""" in message
    assert "--image_size" in message
    # The size given: the grid is what is missing (no more "pass --image_size").
    with pytest.raises(checkpoint.CheckpointError) as err:
        predict.load_for_prediction(path, "testing", image_size=32)
    assert "checkpoint_grid_shape" in str(err.value) and "--image_size" not in str(err.value)
    # The grid given: 2×3 patches of 16 px is 32×48 px, not square, so the size is needed.
    with pytest.raises(checkpoint.CheckpointError, match=r"32×48 px image.*--image_size"):
        predict.load_for_prediction(path, "testing", checkpoint_grid_shape=(2, 3))
    with pytest.raises(checkpoint.CheckpointError, match=r"\(3, 3\) has 9 cells.*6 grid tokens"):
        predict.load_for_prediction(path, "testing", image_size=32, checkpoint_grid_shape=(3, 3))
    with pytest.raises(ValueError, match="two positive integers"):
        predict.load_for_prediction(path, "testing", image_size=32, checkpoint_grid_shape=(6,))


def test_non_square_checkpoint_on_the_command_line(saved_non_square, tmp_path, capsys):
    from PIL import Image

    path, _, _ = saved_non_square
    image = tmp_path / "noise.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    args = [f"--checkpoint={path}", "--model=testing", "--image_size=32", "--json"]
    assert predict.main([*args, str(image)]) == 2
    assert "checkpoint_grid_shape" in capsys.readouterr().err
    assert predict.main([*args, f"--overrides={GRID_OVERRIDE}", str(image)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["top_k"]) == 5 and "error" not in result


def test_non_square_checkpoint_attention_map(saved_non_square, tmp_path, capsys):
    from PIL import Image

    from vit_jax import attention

    path, _, _ = saved_non_square
    image = tmp_path / "noise.png"
    rng = np.random.default_rng(6)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "map.png"
    args = [f"--checkpoint={path}", "--model=testing", "--image_size=32", f"--out={out}"]
    assert attention.main([*args, str(image)]) == 2
    assert "checkpoint_grid_shape" in capsys.readouterr().err
    assert attention.main([*args, f"--overrides={GRID_OVERRIDE}", str(image)]) == 0
    with Image.open(out) as written:
        assert written.size == (50, 40)


def test_non_square_patches_on_a_square_image():
    """Patches of 16×8 px on 32×32 px: a 2×4 grid, a square image; resampled to 4×8 at 64 px."""
    model = models.get_model("testing", num_classes=NUM_CLASSES, patches={"size": (16, 8)})
    params = random_params(model, 32, seed=7)
    assert checkpoint_geometry.infer_image_size(params, model) == 32
    assert checkpoint_geometry.infer_image_size(params, model, grid_shape=(2, 4)) == 32
    loaded_model, loaded, image_size = predict.prepare_for_prediction(
        params, "testing", image_size=64, patches={"size": (16, 8)}
    )
    assert image_size == 64
    expected = checkpoint.interpolate_posembed(
        params["Transformer"]["posembed_input"]["pos_embedding"],
        1 + 32,
        True,
        old_grid_shape=(2, 4),
        new_grid_shape=(4, 8),
    )
    table = loaded["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(table, expected)
    logits = predict.predict(loaded_model, loaded, np.zeros((1, 64, 64, 3), np.float32))
    assert logits.shape == (1, NUM_CLASSES) and np.isfinite(logits).all()


def test_distilled_checkpoint_predicts_at_its_size_with_both_heads(tmp_path):
    no_dropout = {"dropout_rate": 0.0}  # so train=True gives the two heads' exact logits
    trained = models.get_model(
        "testing", num_classes=NUM_CLASSES, distilled=True, transformer=no_dropout
    )
    params = random_params(trained, 48)  # 3×3 grid + class and distillation rows = 11 rows
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape[1] == 11
    # A plain model would read 10 grid rows (no square grid); the distillation row is counted.
    assert checkpoint_geometry.infer_image_size(params, trained) == 48
    checkpoint.save(params, tmp_path / "distilled.npz")
    model, loaded, image_size = predict.load_for_prediction(tmp_path / "distilled.npz", "testing")
    assert (model.distilled, model.num_classes, image_size) == (True, NUM_CLASSES, 48)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
    logits = predict.predict(model, loaded, images, batch_size=2)
    cls_logits, dist_logits = trained.apply({"params": params}, images, train=True)
    np.testing.assert_allclose(logits, (cls_logits + dist_logits) / 2, atol=1e-5, rtol=0)
    resized, _, size = predict.load_for_prediction(
        tmp_path / "distilled.npz", "testing", image_size=64
    )
    assert size == 64 and resized.distilled


@needs_photos
def test_a_workdir_names_the_classes_it_trained_on(saved, tmp_path, capsys):
    """Without --labels, a workdir's task.json supplies the class names; --labels still wins."""
    path, _, _ = saved
    shutil.copy(path, tmp_path / checkpoint.PARAMS_FILE)
    names = [f"class_{i}" for i in range(NUM_CLASSES)]
    task = {"task": "classification", "loss": "softmax_xent", "class_names": names}
    (tmp_path / tasks.INFO_FILE).write_text(json.dumps(task))
    args = [f"--checkpoint={tmp_path}", "--model=testing", "--json", "--top_k=2", photos(1)[0]]
    assert predict.main(args) == 0
    top = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert [e["label"] for e in top] == [names[e["class"]] for e in top]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"other_{i}" for i in range(NUM_CLASSES)))
    assert predict.main([*args[:-1], f"--labels={labels}", photos(1)[0]]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert [e["label"] for e in top] == [f"other_{e['class']}" for e in top]
    assert predict.main([*args[:-1], f"--csv={tmp_path / 's.csv'}", photos(1)[0]]) == 2
    assert "--csv applies to regression checkpoints" in capsys.readouterr().err
    # A sigmoid-trained run's task.json says so: its probabilities are per-class sigmoids, as
    # --sigmoid gives for the bare .npz.
    (tmp_path / tasks.INFO_FILE).write_text(json.dumps({**task, "loss": "sigmoid_xent"}))
    assert predict.main(args) == 0
    from_task = json.loads(capsys.readouterr().out)[0]["top_k"]
    bare = [f"--checkpoint={path}", "--model=testing", "--json", "--top_k=2", "--sigmoid"]
    assert predict.main([*bare, photos(1)[0]]) == 0
    explicit = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert [(e["class"], e["prob"]) for e in from_task] == [
        (e["class"], e["prob"]) for e in explicit
    ]
    # Its eval_crop too: the workdir's default preprocessing is the one its evaluation used.
    cropped = {**task, "eval_crop": "resize_small_crop"}
    (tmp_path / tasks.INFO_FILE).write_text(json.dumps(cropped))
    assert predict.main(args) == 0
    from_task = json.loads(capsys.readouterr().out)[0]["top_k"]
    bare[-1] = "--eval_crop=resize_small_crop"
    assert predict.main([*bare, photos(1)[0]]) == 0
    explicit = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert from_task == [{**e, "label": names[e["class"]]} for e in explicit]
    assert predict.main([*bare[:-1], photos(1)[0]]) == 0  # 'resize': other numbers
    assert json.loads(capsys.readouterr().out)[0]["top_k"] != explicit
