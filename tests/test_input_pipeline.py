"""Tests for vit_jax.input_pipeline: offline, on tiny data (digits, image folder, tfds mock)."""

import collections
import errno
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import image_folder, indexed_sources, tfds_source
from vit_jax import input_pipeline as ip

DEVICES = 8


def _train(dataset="sklearn_digits", split="train", **kw):
    args = dict(image_size=8, global_batch_size=16, local_device_count=DEVICES, seed=0)
    return ip.get_train_iterator(dataset, split, **(args | kw))


def _eval(dataset="sklearn_digits", split="test", **kw):
    args = dict(image_size=8, global_batch_size=64, local_device_count=DEVICES)
    return ip.get_eval_iterator(dataset, split, **(args | kw))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _eval_labels(batches):
    """Class ids of the real (mask 1) examples, and the number of padded ones."""
    labels, padded = [], 0
    for batch in batches:
        mask = batch["mask"].reshape(-1)
        label = batch["label"].reshape(mask.size, -1)
        labels += list(label[mask == 1].argmax(-1))
        padded += int((mask == 0).sum())
        assert not label[mask == 0].any()
    return labels, padded


# ----------------------------------------------------------------------------------------------
# Embedded digits.


def test_digits_info_split_sizes_and_classes():
    info = ip.get_dataset_info("sklearn_digits", train_split="train", test_split="test")
    assert info.num_classes == 10
    assert info.class_names == tuple("0123456789")
    assert info.num_examples == {"train": 1437, "test": 360}  # 1797, stratified 80/20
    train_y, test_y = (
        indexed_sources._digits_split("train")[1],
        indexed_sources._digits_split("test")[1],
    )
    assert set(np.bincount(test_y)) <= {35, 36, 37}  # stratified: about 36 per class
    assert len(train_y) + len(test_y) == 1797
    images = indexed_sources._digits_split("train")[0]
    assert images.shape == (1437, 8, 8, 3) and images.dtype == np.uint8 and images.max() == 255


def test_train_batch_shapes_dtypes_and_range():
    batch = next(_train(image_size=16))
    assert batch["image"].shape == (DEVICES, 2, 16, 16, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (DEVICES, 2, 10)
    assert batch["label"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["label"].sum(-1), 1.0)


def test_train_stream_is_reproducible_and_resumes_exactly():
    uninterrupted = _take(_train(seed=3), 5)
    again = _take(_train(seed=3), 5)
    resumed = _take(_train(seed=3, start_step=3), 2)
    for a, b in zip(uninterrupted, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(uninterrupted[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = next(_train(seed=4))
    assert not np.array_equal(other_seed["image"], uninterrupted[0]["image"])


def test_global_batches_do_not_depend_on_the_process_count():
    """Process i's batch is the i-th part of the 1-process global batch, through 2+ epochs."""
    one = _train(global_batch_size=48)
    two = [
        _train(global_batch_size=48, local_device_count=4, process_index=i, process_count=2)
        for i in range(2)
    ]
    for _ in range(70):  # 70 × 48 = 3360 > 2 × 1437
        whole, parts = next(one), [next(t) for t in two]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


def test_each_epoch_reads_every_example_once():
    """The first epoch's positions are a permutation of the split (raw, before augmentation)."""
    images, labels = indexed_sources._digits_split("train")
    elements = indexed_sources.global_order(
        images,
        {"label": labels},
        seed=0,
        start_step=0,
        global_batch_size=16,
        process_index=0,
        process_count=1,
    )
    positions, raw = [], []
    for position, example in elements.take(len(labels)).as_numpy_iterator():
        positions.append(position)
        raw.append(example["image"].tobytes() + bytes([example["label"]]))
    assert positions == list(range(len(labels)))
    expected = [x.tobytes() + bytes([y]) for x, y in zip(images, labels, strict=True)]
    assert collections.Counter(raw) == collections.Counter(expected)
    second = indexed_sources.global_order(
        images,
        {"label": labels},
        seed=0,
        start_step=len(labels) // 16 + 1,
        global_batch_size=16,
        process_index=0,
        process_count=1,
    )
    assert next(second.as_numpy_iterator())[0] == (len(labels) // 16 + 1) * 16


def test_augmentation_differs_across_processes():
    first = next(_train(process_index=0, process_count=2))
    second = next(_train(process_index=1, process_count=2))
    assert first["image"].shape == (DEVICES, 1, 8, 8, 3)
    assert not np.array_equal(first["image"], second["image"])


def test_eval_covers_every_example_once_with_padding():
    batches = _eval()
    assert len(batches) == 6  # ceil(360 / 64)
    labels, padded = _eval_labels(batches)
    assert padded == 6 * 64 - 360
    assert collections.Counter(labels) == collections.Counter(
        indexed_sources._digits_split("test")[1].tolist()
    )
    again, _ = _eval_labels(batches)  # re-iterable, one full pass each time
    assert again == labels
    first = next(iter(batches))
    assert first["image"].shape == (DEVICES, 8, 8, 8, 3)
    assert first["mask"].shape == (DEVICES, 8) and first["mask"].dtype == np.float32


def test_eval_over_two_processes_is_disjoint_and_complete():
    per_process = [_eval(process_index=i, process_count=2) for i in range(2)]
    assert len(per_process[0]) == len(per_process[1])  # no process waits on the other
    labels = [_eval_labels(batches)[0] for batches in per_process]
    assert [len(x) for x in labels] == [180, 180]
    assert collections.Counter(labels[0] + labels[1]) == collections.Counter(
        indexed_sources._digits_split("test")[1].tolist()
    )


def test_eval_resize_small_crop_shape():
    batch = next(iter(_eval(image_size=16, eval_crop="resize_small_crop")))
    assert batch["image"].shape == (DEVICES, 8, 16, 16, 3)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_eval_resize_is_exact_at_native_size():
    batch = next(iter(_eval(global_batch_size=8)))
    raw = indexed_sources._digits_split("test")[0][:8].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"].reshape(8, 8, 8, 3), raw, atol=1e-6)


def test_inception_crop_on_tiny_images_upscales():
    image = tf.constant(np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    for i in range(10):
        crop = ip._inception_crop(image, tf.constant([i, 0], tf.int64))
        assert crop.shape[0] >= 1 and crop.shape[1] >= 1 and crop.shape[2] == 3
        assert ip._resize(crop, 32).shape == (32, 32, 3)


def test_multi_hot_labels():
    label = ip._encode_label(tf.constant([1, 3, 3], tf.int64), 5, multi_hot=True)
    np.testing.assert_array_equal(label.numpy(), [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="targets='multi_hot'"):
        ip._encode_label(tf.constant([1, 3], tf.int64), 5, multi_hot=False)


def test_targets_kinds():
    """targets='one_hot' is the default; a single-label source reads alike as multi_hot."""
    one_hot = next(_train())
    multi = next(iter(_eval(global_batch_size=8, targets="multi_hot")))
    np.testing.assert_array_equal(multi["label"], next(iter(_eval(global_batch_size=8)))["label"])
    with pytest.raises(ValueError, match="Unknown targets 'onehot'; valid values: one_hot, multi"):
        _eval(targets="onehot")
    value = next(_train(targets="value"))  # the class name's value: the digit
    np.testing.assert_array_equal(value["target"][..., 0], one_hot["label"].argmax(-1))


# ----------------------------------------------------------------------------------------------
# Clear errors.


def test_batch_not_divisible_names_the_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size=12 .* 2 × 8 = 16"):
        _train(global_batch_size=12, process_count=2)
    with pytest.raises(ValueError, match="global_batch_size=10"):
        _eval(global_batch_size=10)


def test_unknown_eval_crop():
    with pytest.raises(ValueError, match="resize_small_crop"):
        _eval(eval_crop="centre")


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ip.get_dataset_info(
            "cifar10",
            train_split="train",
            test_split="test",
            data_dir=str(tmp_path),
            download=False,
        )
    message = str(err.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"tfds build cifar10 --data_dir={tmp_path}" in message


# ----------------------------------------------------------------------------------------------
# Image folders.


def _save(path, image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def _rgb(seed, size=(12, 10)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _make_folder(root):
    """train: cat ×3 (JPEG, grey PNG, RGBA PNG), dog ×3 (16-bit PNG, CMYK JPEG, palette PNG)
    plus a corrupt JPEG and a text file; test: one image per class."""
    train, test = root / "train", root / "test"
    _save(train / "cat" / "a.jpg", _rgb(0))
    _save(train / "cat" / "b.png", _rgb(1).convert("L"))
    _save(train / "cat" / "c.png", _rgb(2).convert("RGBA"))
    _save(train / "dog" / "d.png", Image.fromarray(np.full((9, 7), 65535, np.uint16)))
    _save(train / "dog" / "e.jpg", _rgb(3).convert("CMYK"))
    _save(train / "dog" / "f.png", _rgb(4).convert("P"))
    (train / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (train / "dog" / "notes.txt").write_text("not an image")
    _save(test / "cat" / "g.png", _rgb(5, (5, 5)))
    _save(test / "dog" / "h.jpg", _rgb(6, (30, 20)))
    return root


def test_folder_mixed_formats_skips_bad_files_once(tmp_path, caplog):
    root = _make_folder(tmp_path / "pets")
    dataset = f"folder:{root}"
    with caplog.at_level(logging.WARNING, logger=ip.__name__):
        info = ip.get_dataset_info(dataset, train_split="train", test_split="test")
        batches = _eval(dataset, "train", global_batch_size=8)
        next(_train(dataset, global_batch_size=8))
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "skipped 2" in warnings[0]
    assert "broken.jpg" in warnings[0] and "notes.txt" in warnings[0]
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    assert info.num_examples == {"train": 6, "test": 2}
    labels, padded = _eval_labels(batches)
    assert sorted(labels) == [0, 0, 0, 1, 1, 1] and padded == 2
    batch = next(iter(batches))
    assert batch["image"].shape == (DEVICES, 1, 8, 8, 3)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def _smooth_jpeg(path, size=(40, 48), seed=0, quality=90):
    """A photo-like JPEG: random colours, smoothly upsampled, a little noise; returns the path."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    smooth = np.asarray(small.resize(size[::-1], Image.Resampling.BICUBIC), np.float64)
    noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    return _save(path, Image.fromarray(noisy), quality=quality)


def _normalized(pixels):
    """uint8 → the pipeline's float32 in [-1, 1], computed in float32 as the pipeline does."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _decoded(source):
    """Every element of a source, decoded by the source's own decode: {path: uint8 array}."""
    return {
        x["image"].paths.numpy().decode(): source.decode(x["image"]).numpy() for x in source.dataset
    }


def test_folder_jpeg_decodes_as_tf_decode_jpeg_in_every_path(tmp_path):
    """Training, evaluation and eval_image decode a JPEG exactly as `tf.io.decode_jpeg` does."""
    root = tmp_path / "photos"
    files = {}
    for split, seed in (("train", 0), ("test", 1)):
        for label, name in enumerate(("cat", "dog")):
            path = _smooth_jpeg(
                root / split / name / f"{seed}{label}.jpg", (32, 32), seed + 2 * label
            )
            files[str(path)] = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
    for path, reference in files.items():  # the decoders do differ on these files
        pillow = image_folder._read_rgb(path)
        # Measured: 67-71 % of the values (87-90 % of the pixels) differ, by up to 4-5 / 255.
        assert np.mean(pillow != reference) > 0.5, path
        assert 3 <= np.abs(pillow.astype(int) - reference).max() <= 12
        assert image_folder.tf_decodes(path)
        np.testing.assert_array_equal(image_folder.read_image(path), reference)
        np.testing.assert_array_equal(ip.eval_image(path, 32), _normalized(reference))
    for split in ("train", "test"):
        source = ip._load_source(f"folder:{root}", split)
        decoded = _decoded(source)
        assert sorted(decoded) == sorted(p for p in files if f"/{split}/" in p)
        for path, image in decoded.items():
            np.testing.assert_array_equal(image, files[path])
    # The training order carries each file's decoder next to its path.
    source = ip._load_source(f"folder:{root}", "train")
    elements = indexed_sources.global_order(
        *source.arrays, seed=0, start_step=0, global_batch_size=2, process_index=0, process_count=1
    )
    for _, example in elements.take(2):
        image = source.decode(example["image"]).numpy()
        np.testing.assert_array_equal(image, files[example["image"].paths.numpy().decode()])
    (batch,) = list(_eval(f"folder:{root}", image_size=32, global_batch_size=8))
    images = batch["image"].reshape(-1, 32, 32, 3)[batch["mask"].reshape(-1) == 1]
    expected = [files[p] for p in sorted(files) if "/test/" in p]
    np.testing.assert_array_equal(images, _normalized(np.stack(expected)))


def test_folder_every_mode_decodes_to_rgb_uint8(tmp_path):
    root = _make_folder(tmp_path / "pets")
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)  # 16-bit grey, every level
    _save(root / "train" / "dog" / "ramp.png", Image.fromarray(ramp))
    clear = _rgb(7).convert("P")
    _save(root / "train" / "dog" / "clear.png", clear, transparency=0)
    # Which decoder reads each file: TF's where it reads it as Pillow does (JPEG: always).
    expected_tf = {
        "a.jpg": True,  # RGB JPEG
        "b.png": True,  # grey
        "c.png": True,  # RGBA: alpha dropped by both
        "d.png": True,  # 16-bit, all 65535: 255 by both
        "ramp.png": False,  # 16-bit: TF keeps the high byte, Pillow's path rounds x / 257
        "e.jpg": False,  # CMYK JPEG
        "f.png": True,  # palette
        "clear.png": True,  # palette with a transparent index: alpha dropped by both
    }
    source = ip._load_source(f"folder:{root}", "train")
    decoded = {os.path.basename(p): image for p, image in _decoded(source).items()}
    verdicts = dict(zip(*source.arrays[0], strict=True))
    assert {os.path.basename(p): bool(v) for p, v in verdicts.items()} == expected_tf
    for path in sorted((root / "train").rglob("*.*")):
        if path.name in ("broken.jpg", "notes.txt"):
            assert not indexed_sources._is_readable_image(str(path))
            with pytest.raises((OSError, ValueError)):
                image_folder.read_image(str(path))
            continue
        image = decoded[path.name]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, path.name
        np.testing.assert_array_equal(image, image_folder.read_image(str(path)), path.name)
    white = decoded["d.png"]  # 16-bit 65535 → 255, not clipped
    assert Image.open(root / "train" / "dog" / "d.png").mode.startswith("I")
    np.testing.assert_array_equal(white, 255)
    levels = decoded["ramp.png"][..., 0].astype(int)
    np.testing.assert_array_equal(levels, np.round(ramp / 257.0))
    tf_levels = tf.io.decode_png((root / "train" / "dog" / "ramp.png").read_bytes()).numpy()
    np.testing.assert_array_equal(tf_levels[..., 0], ramp // 256)  # what TF would have given
    grey = decoded["b.png"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_array_equal(grey[..., 0], np.asarray(_rgb(1).convert("L")))
    np.testing.assert_array_equal(decoded["c.png"], np.asarray(_rgb(2)))  # RGBA → its RGB
    cmyk = Image.open(root / "train" / "dog" / "e.jpg")
    assert cmyk.mode == "CMYK"
    np.testing.assert_array_equal(decoded["e.jpg"], np.asarray(cmyk.convert("RGB")))
    opaque = clear.convert("RGBA").convert("RGB")  # the palette's colours, alpha dropped
    np.testing.assert_array_equal(decoded["clear.png"], np.asarray(opaque))


def test_resize_small_crop_shrinks_with_area_averaging():
    """A 1-pixel checkerboard shrunk 3.75× is a flat grey (area), not aliased stripes."""
    board = (np.indices((60, 60)).sum(0) % 2 * 255).astype(np.uint8)
    image = tf.constant(np.repeat(board[..., None], 3, -1))
    shrunk = ip._resize_small_centre_crop(image, 14).numpy()  # shorter side → 16, crop 14
    assert shrunk.shape == (14, 14, 3)
    assert np.abs(shrunk - 127.5).max() < 1  # measured 0.57 (3.75 × 3.75 pixels averaged)
    bilinear = tf.image.resize(image, [16, 16], method="bilinear").numpy()[1:15, 1:15]
    assert np.abs(bilinear - 127.5).max() > 60  # plain bilinear: measured 71.7, aliasing
    # Enlarging: bilinear (area would repeat pixels in blocks).
    small = tf.constant(np.asarray(_rgb(8, (8, 8))))
    enlarged = ip._resize_small_centre_crop(small, 14).numpy()
    expected = tf.image.resize(small, [16, 16], method="bilinear").numpy()[1:15, 1:15]
    np.testing.assert_array_equal(enlarged, expected)


def test_folder_follows_directory_links_once_and_survives_loops(tmp_path):
    """A class folder's linked sub-directory is read, once, even through a loop or two links."""
    root = tmp_path / "pets"
    cat = root / "train" / "cat"
    _save(cat / "a.png", _rgb(0))
    extra = tmp_path / "elsewhere" / "more_cats"
    for i in range(8):
        _save(extra / f"{i}.png", _rgb(10 + i))
    (cat / "more").symlink_to(extra, target_is_directory=True)
    (cat / "more_again").symlink_to(extra, target_is_directory=True)  # the same directory again
    (cat / "alias.png").symlink_to(cat / "a.png")  # the same file again
    (extra / "loop").symlink_to(cat, target_is_directory=True)  # a link loop
    _save(root / "train" / "dog" / "d.png", _rgb(1))
    for name in ("cat", "dog"):
        _save(root / "test" / name / "t.png", _rgb(2))
    files = image_folder.list_files(str(cat))
    assert files == [str(cat / "a.png")] + [str(cat / "more" / f"{i}.png") for i in range(8)]
    info = ip.get_dataset_info(f"folder:{root}", train_split="train", test_split="test")
    assert info.num_examples == {"train": 10, "test": 2}
    (root / "train" / "dog" / "self").symlink_to(root / "train" / "dog")  # loop onto itself
    assert image_folder.list_files(str(root / "train" / "dog")) == [str(root / "train/dog/d.png")]


def test_unreadable_class_folder_says_permission_denied(tmp_path, monkeypatch):
    """One error naming the directory, saying it cannot be read and how to fix it."""
    root = _make_folder(tmp_path / "pets")
    (root / "train" / "cat" / "deeper").mkdir()
    _save(root / "train" / "cat" / "deeper" / "x.png", _rgb(9))
    scandir = os.scandir
    denied = set()

    def scandir_as_another_user(path="."):  # tests run as root, which chmod 000 does not stop
        if os.fspath(path) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_as_another_user)
    for where in ("train/dog", "train/cat/deeper", "train"):
        denied.clear()
        denied.add(str(root / where))
        indexed_sources._scan_folder_split.cache_clear()
        with pytest.raises(PermissionError) as err:
            ip.get_dataset_info(f"folder:{root}", train_split="train", test_split="test")
        message = str(err.value)
        assert f"{root / where}' cannot be read" in message, message
        assert "permission denied" in message and f"chmod -R a+rX {root / where}" in message
        assert "run as a user who can read it" in message
    monkeypatch.undo()
    if os.geteuid() != 0:  # the real thing, where the permission bits apply
        (root / "train" / "dog").chmod(0)
        try:
            with pytest.raises(PermissionError, match=r"train/dog' cannot be read"):
                ip.get_dataset_info(f"folder:{root}", train_split="train", test_split="test")
        finally:
            (root / "train" / "dog").chmod(0o755)


def test_multiprocess_verdicts_carry_the_decoder(tmp_path, monkeypatch):
    """The all-gathered verdicts of 2 processes say which decoder reads each file, as 1 does."""
    from jax.experimental import multihost_utils

    root = _make_folder(tmp_path / "pets")
    names = ["cat/a.jpg", "dog/e.jpg", "dog/broken.jpg", "cat/c.png", "dog/notes.txt"]
    paths = [str(root / "train" / n) for n in names]
    expected = [
        indexed_sources._TF_DECODES,
        indexed_sources._PILLOW_DECODES,
        indexed_sources._UNREADABLE,
        indexed_sources._TF_DECODES,
        indexed_sources._UNREADABLE,
    ]
    assert indexed_sources._decode_check(paths) == expected  # one process decodes them all

    def allgather(_):  # what the 2 processes of a real run would contribute
        shares = [indexed_sources._decode_check(paths[i::2]) for i in range(2)]
        return np.array([share + [0] * (3 - len(share)) for share in shares], np.uint8)

    monkeypatch.setattr(indexed_sources, "_in_multiprocess_run", lambda count: True)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    assert [indexed_sources._readable(paths, i, 2) for i in range(2)] == [expected, expected]


def test_folder_process_slices_are_disjoint_and_cover(tmp_path):
    root = _make_folder(tmp_path / "pets")
    slices = []
    for i in range(2):
        source = ip._load_source(f"folder:{root}", "train", process_index=i, process_count=2)
        slices.append({x["image"] for x in source.dataset.as_numpy_iterator()})
        assert source.num_examples == 3 and source.max_process_examples == 3
    assert not slices[0] & slices[1]
    assert len(slices[0] | slices[1]) == 6


def test_folder_errors_name_the_path(tmp_path):
    root = _make_folder(tmp_path / "pets")
    for split in ("train", "test"):
        other = tmp_path / f"no_{split}"
        (other / ("test" if split == "train" else "train") / "cat").mkdir(parents=True)
        with pytest.raises(ValueError, match=f"no '{split}/' directory.*{other}"):
            ip.get_dataset_info(f"folder:{other}", train_split="train", test_split="test")
    (root / "train" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"Class folder .*train/bird"):
        ip.get_dataset_info(f"folder:{root}", train_split="train", test_split="test")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(ValueError, match=f"{empty}/train.* no class"):
        ip.get_dataset_info(f"folder:{empty}", train_split="train", test_split="test")
    with pytest.raises(ValueError, match="splits"):
        _train(f"folder:{root}", "validation")
    junk = tmp_path / "junk"
    for split in ("train", "test"):
        (junk / split / "cat").mkdir(parents=True)
        (junk / split / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{junk}/train.* no readable images"):
        ip.get_dataset_info(f"folder:{junk}", train_split="train", test_split="test")


# ----------------------------------------------------------------------------------------------
# tfds (mocked: no download, no files).


def test_tfds_mock_cifar10_info_train_and_eval():
    with tfds.testing.mock_data(num_examples=12):
        info = ip.get_dataset_info("cifar10", train_split="train[:98%]", test_split="test")
        assert info.num_classes == 10 and len(info.class_names) == 10
        assert info.num_examples == {"train[:98%]": 12, "test": 12}
        kw = dict(image_size=16, shuffle_buffer=32)  # a big buffer would draw 10k mock images
        stream = _take(_train("cifar10", "train[:98%]", **kw), 3)
        resumed = next(_train("cifar10", "train[:98%]", start_step=2, **kw))
        batches = _eval("cifar10", "test", global_batch_size=8)
        labels, padded = _eval_labels(batches)
    assert stream[0]["image"].shape == (DEVICES, 2, 16, 16, 3)
    assert stream[0]["label"].shape == (DEVICES, 2, 10)
    np.testing.assert_array_equal(stream[2]["image"], resumed["image"])
    assert len(labels) == 12 and padded == 4 and len(batches) == 2


def test_prefetch_to_device_shapes():
    import jax

    batch = next(ip.prefetch_to_device(_train(), 2))
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].shape == (DEVICES, 2, 8, 8, 3)


def test_tfds_reads_an_even_split_per_process(monkeypatch):
    requested = []
    load = tfds_source._tfds_load

    def recording_load(name, split, **kw):
        requested.append(split)
        return load(name, split, **kw)

    monkeypatch.setattr(tfds_source, "_tfds_load", recording_load)
    with tfds.testing.mock_data(num_examples=6):
        for i in range(2):
            _eval("cifar10", "test", global_batch_size=16, process_index=i, process_count=2)
    assert requested == tfds.even_splits("test", n=2, drop_remainder=False)
