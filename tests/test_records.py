"""Prepared records: `vit_jax.prepare_data` (folder → ArrayRecord shards) and `'records:'` input.

Folders are made by the tests: small generated images with corrupt and odd files among them,
and the embedded digits written out as PNG files (lossless: the records hold the pixels the
in-memory digits have).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from array_record.python import array_record_module
from PIL import Image

from tests.test_learns import learning_config
from vit_jax import (
    checkpoint,
    image_folder,
    indexed_sources,
    input_pipeline,
    prepare_data,
    records_source,
    train,
)
from vit_jax import records_format as rf

CLASSES = ("cat", "dog", "eel")


def _noise(rng, height, width, mode="RGB"):
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def _folder(root, per_class=(9, 3), seed=0):
    """train/ and test/ folders of JPEG and PNG noise images, sizes varying."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for name in CLASSES:
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(count):
                image = _noise(rng, 12 + i, 16 + 2 * i)
                image.save(directory / (f"{i}.png" if i % 3 == 0 else f"{i}.jpg"), quality=90)
    return root


def _odd_files(root):
    """Bad and odd files in train/: {relative path: reason prefix} of those to be skipped."""
    rng = np.random.default_rng(1)
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    (cat / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.txt").write_text("a text file among the images")
    os.symlink(root / "nowhere.jpg", dog / "broken_link.jpg")
    os.mkfifo(dog / "a_fifo.jpg")
    (dog / ".hidden.jpg").write_bytes(b"hidden files are not listed")
    _noise(rng, 10, 14).convert("CMYK").save(dog / "cmyk.jpg")  # kept: Pillow's path
    sixteen = (rng.integers(0, 65536, (9, 11))).astype(np.uint16)
    Image.fromarray(sixteen).save(dog / "grey16.png")  # kept: Pillow's path
    _noise(rng, 9, 13, "L").save(dog / "grey.png")  # kept: TF's path
    return {
        "train/cat/corrupt.jpg": "not a readable image",
        "train/cat/empty.jpg": "empty file",
        "train/cat/notes.txt": "not a readable image",
        "train/dog/broken_link.jpg": "cannot be read",
        "train/dog/a_fifo.jpg": "not a regular file",
    }


def _prepare(folder, out, **options):
    lines = []
    manifest = prepare_data.prepare(
        prepare_data.Options(folder=str(folder), out=str(out), **options), log=lines.append
    )
    return manifest, lines


def _decode_record(record: bytes) -> dict:
    """A record's fields, read with protobuf alone (not the package's graph-mode parser)."""
    feature = tf.train.Example.FromString(record).features.feature
    return {
        "image": feature["image"].bytes_list.value[0],
        "tf_decodes": bool(feature["tf_decodes"].int64_list.value[0]),
        "label": int(feature["label"].int64_list.value[0]),
        "file": feature["file"].bytes_list.value[0].decode(),
    }


def _all_records(out, split):
    manifest = rf.read_manifest(str(out))
    records = []
    for shard in manifest["splits"][split]["shards"]:
        reader = array_record_module.ArrayRecordReader(str(out / shard["file"]))
        records += [_decode_record(r) for r in reader.read_all()]
        reader.close()
    return records


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A folder with odd files, prepared with 4-file shards: (folder, out, manifest, log)."""
    root = tmp_path_factory.mktemp("records")
    folder = _folder(root / "images")
    skipped = _odd_files(folder)
    manifest, lines = _prepare(folder, root / "records", shard_size=4)
    return folder, root / "records", manifest, lines, skipped


def test_preparation_skips_each_bad_file_once_with_its_reason(prepared):
    _, out, manifest, lines, expected = prepared
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert len(manifest["skipped"]) == len(reasons) == len(expected)  # each once
    assert set(reasons) == set(expected)
    for file, prefix in expected.items():
        assert reasons[file].startswith(prefix), (file, reasons[file])
    assert "0x" not in reasons["train/cat/corrupt.jpg"]  # no object addresses in the report
    assert any("skipped 5 file(s)" in line for line in lines)
    # 9 per class + the three odd images kept in dog/ (CMYK, 16-bit grey, grey); 3 per class.
    assert manifest["splits"]["train"]["per_class"] == [9, 12, 9]
    assert manifest["splits"]["test"]["per_class"] == [3, 3, 3]
    assert manifest["splits"]["train"]["num_records"] == 30
    assert manifest["class_names"] == list(CLASSES)
    # 9 + 12 + 9 + 5 skipped = 35 files in 4-file shards: 9 shards, the counts add up.
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == 9 and sum(s["num_records"] for s in shards) == 30
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_records_hold_the_files_bytes_and_decode_to_the_folders_pixels(prepared):
    folder, out, *_ = prepared
    records = _all_records(out, "train")
    assert len(records) == 30
    verdicts = {}
    for record in records:
        path = folder / record["file"]
        assert record["image"] == path.read_bytes()  # stored as they are, not re-encoded
        assert record["label"] == CLASSES.index(path.parent.name)
        assert record["tf_decodes"] == image_folder.tf_decodes(str(path))
        verdicts[path.name] = record["tf_decodes"]
        pixels = image_folder.decode_data(
            tf.constant(record["image"]), tf.constant(record["tf_decodes"])
        ).numpy()
        np.testing.assert_array_equal(pixels, image_folder.read_image(str(path)))
    assert verdicts["cmyk.jpg"] is False and verdicts["grey16.png"] is False  # Pillow's path
    assert verdicts["grey.png"] is True and verdicts["1.jpg"] is True


def test_evaluation_from_records_equals_the_folder_pipeline_and_counts_each_example_once(
    prepared,
):
    folder, out, *_ = prepared
    kwargs = {"image_size": 16, "global_batch_size": 8, "local_device_count": 2}

    def images_and_labels(dataset, process_index, process_count):
        batches = input_pipeline.get_eval_iterator(
            dataset, "test", process_index=process_index, process_count=process_count, **kwargs
        )
        stacked = {
            k: np.concatenate([b[k].reshape(-1, *b[k].shape[2:]) for b in batches])
            for k in ("image", "label", "mask")
        }
        keep = stacked["mask"] == 1
        return stacked["image"][keep], stacked["label"][keep], len(batches)

    folder_images, folder_labels, _ = images_and_labels(f"folder:{folder}", 0, 1)
    records_images, records_labels, _ = images_and_labels(f"records:{out}", 0, 1)
    np.testing.assert_array_equal(records_images, folder_images)
    np.testing.assert_array_equal(records_labels, folder_labels)
    parts = [images_and_labels(f"records:{out}", i, 2) for i in range(2)]
    assert parts[0][2] == parts[1][2]  # the same number of batches on both processes
    assert len(parts[0][0]) + len(parts[1][0]) == 9  # every example once over the processes
    merged = np.empty_like(records_images)
    merged[0::2], merged[1::2] = parts[0][0], parts[1][0]  # process i: examples i, i + 2, …
    np.testing.assert_array_equal(merged, records_images)


def test_two_processes_read_disjoint_parts_whose_union_is_the_epoch(prepared):
    _, out, manifest, *_ = prepared
    n = manifest["splits"]["train"]["num_records"]  # 30
    batch, steps = 8, 4  # 32 positions ≥ one epoch
    source = records_source.records_source(str(out), "train", 0, 1)

    def stream(process_index, process_count):
        ds = source.global_stream(
            seed=3,
            start_step=0,
            global_batch_size=batch,
            process_index=process_index,
            process_count=process_count,
        )
        items = ds.take(steps * batch // process_count).as_numpy_iterator()
        return [(int(p), e["image"].data) for p, e in items]

    one = stream(0, 1)
    two = [stream(i, 2) for i in range(2)]
    positions = [{p for p, _ in part} for part in two]
    assert not positions[0] & positions[1]
    assert positions[0] | positions[1] == set(range(steps * batch))
    # Each global batch is process 0's part then process 1's, as one process reads it.
    by_position = dict(two[0] + two[1])
    assert [by_position[p] for p, _ in one] == [data for _, data in one]
    epoch = [data for p, data in one if p < n]
    assert sorted(epoch) == sorted(r["image"] for r in _all_records(out, "train"))
    keys = records_source.training_keys(n, seed=3)
    first, second = [keys[p] for p in range(n)], [keys[p] for p in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second  # a new permutation per epoch


def test_start_up_reads_the_manifest_only(prepared, monkeypatch):
    _, out, *_ = prepared
    opened = []
    reader = array_record_module.ArrayRecordReader

    def counting_reader(*args, **kwargs):
        opened.append(args[0])
        return reader(*args, **kwargs)

    monkeypatch.setattr(array_record_module, "ArrayRecordReader", counting_reader)
    records_source._records.cache_clear()
    info = input_pipeline.get_dataset_info(f"records:{out}", train_split="train", test_split="test")
    assert info.num_examples == {"train": 30, "test": 9} and info.num_classes == 3
    records_source.records_source(str(out), "train", 0, 1)
    assert opened == []  # the manifest and one listing of the directory, no shard opened
    batch = next(iter(records_source.records_source(str(out), "test", 0, 1).dataset))
    assert batch["label"].numpy() == 0
    # The first read (a chunk of up to 256 records) opens the shards it reads: the test split's.
    assert sorted(os.path.basename(p) for p in opened) == [
        f"test-0000{k}-of-00003.array_record" for k in range(3)
    ]
    records_source._records.cache_clear()


def test_max_side_re_encodes_only_larger_images(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (folder / split / "a").mkdir(parents=True)
        _noise(rng, 40, 64).save(folder / split / "a" / "big.png")
        _noise(rng, 20, 30).save(folder / split / "a" / "small.jpg")
    _prepare(folder, tmp_path / "out", max_side=32)
    records = {r["file"]: r for r in _all_records(tmp_path / "out", "train")}
    big = records["train/a/big.png"]
    assert big["tf_decodes"] and big["image"][:2] == b"\xff\xd8"  # JPEG now
    shape = tf.io.decode_jpeg(big["image"]).shape
    assert tuple(shape) == (20, 32, 3)
    assert records["train/a/small.jpg"]["image"] == (folder / "train/a/small.jpg").read_bytes()


def test_single_folder_holdout_is_stratified_seeded_and_disjoint(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, count in (("a", 20), ("b", 10), ("c", 6)):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            _noise(rng, 6, 6).save(folder / name / f"{i}.png")
    manifest, _ = _prepare(folder, tmp_path / "out0", holdout=9, shard_size=5)
    # 9 of 36 = 1/4 of each class by largest remainder: 5, 2.5 and 1.5 floor to 8; the ninth
    # goes to the larger remainder, tied, so to the lower class index: 5, 3, 1.
    assert manifest["splits"]["test"]["per_class"] == [5, 3, 1]
    train_files = {r["file"] for r in _all_records(tmp_path / "out0", "train")}
    test_files = {r["file"] for r in _all_records(tmp_path / "out0", "test")}
    assert not train_files & test_files and len(train_files | test_files) == 36
    _prepare(folder, tmp_path / "out1", holdout=9, shard_size=5)
    assert {r["file"] for r in _all_records(tmp_path / "out1", "test")} == test_files
    _prepare(folder, tmp_path / "out2", holdout=9, shard_size=5, seed=1)
    assert {r["file"] for r in _all_records(tmp_path / "out2", "test")} != test_files
    fraction, _ = _prepare(folder, tmp_path / "out3", holdout=0.25, shard_size=5)
    assert fraction["splits"]["test"]["num_records"] == 9


def test_hosts_prepare_disjoint_shares_and_the_last_writes_the_manifest(tmp_path):
    folder = _folder(tmp_path / "images")
    single, _ = _prepare(folder, tmp_path / "single", shard_size=5)
    first, lines = _prepare(
        folder, tmp_path / "shared", shard_size=5, process_index=1, process_count=2
    )
    assert first is None and not (tmp_path / "shared" / rf.MANIFEST).exists()
    assert any("still missing" in line for line in lines)
    written = {n for n in os.listdir(tmp_path / "shared") if n.endswith(rf.SHARD_SUFFIX)}
    assert written == {
        s.name
        for j, s in enumerate(
            prepare_data.make_plan(prepare_data.Options(str(folder), "x", shard_size=5)).shards
        )
        if j % 2 == 1
    }
    last, _ = _prepare(folder, tmp_path / "shared", shard_size=5, process_index=0, process_count=2)
    assert last == single
    assert _all_records(tmp_path / "shared", "train") == _all_records(tmp_path / "single", "train")


def test_preparation_killed_with_sigkill_resumes_with_the_shards_already_written(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("test", 2)):
        (folder / split / "a").mkdir(parents=True)
        for i in range(count):  # large noise PNGs: both decoders read each one (~10 ms)
            _noise(rng, 384, 384).save(folder / split / "a" / f"{i:02d}.png", compress_level=0)
    command = [
        sys.executable,
        "-m",
        "vit_jax.prepare_data",
        f"--folder={folder}",
        f"--out={tmp_path / 'out'}",
        "--shard_size=1",
        "--workers=1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (tmp_path / "out").exists() and any(
            n.endswith(rf.SIDECAR_SUFFIX) for n in os.listdir(tmp_path / "out")
        ):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()
    names = os.listdir(tmp_path / "out")
    complete = [n for n in names if n.endswith(rf.SHARD_SUFFIX + rf.SIDECAR_SUFFIX)]
    assert 1 <= len(complete) < 50 and rf.MANIFEST not in names
    with pytest.raises(rf.RecordsError, match="did not finish"):
        rf.read_manifest(str(tmp_path / "out"))

    rerun = subprocess.run(command, capture_output=True, text=True, check=True)
    assert f"{len(complete)} already written" in rerun.stdout, rerun.stdout
    reference, _ = _prepare(folder, tmp_path / "reference", shard_size=1)
    resumed = rf.read_manifest(str(tmp_path / "out"))
    assert resumed == reference
    assert _all_records(tmp_path / "out", "train") == _all_records(tmp_path / "reference", "train")
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_a_process_exits_promptly_with_a_training_iterator_still_open(prepared):
    # Before input_pipeline closed live iterators at exit, this hung for good in 3 of 4 runs
    # (tf.data's destructor waiting on a call into Python during interpreter finalisation).
    _, out, *_ = prepared
    code = (
        "from vit_jax import input_pipeline\n"
        f"batches = input_pipeline.get_train_iterator('records:{out}', 'train', image_size=8, "
        "global_batch_size=4, local_device_count=1, seed=0)\n"
        "next(batches)\n"
        "print('one batch')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "one batch" in result.stdout, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Bad inputs: one clear error before any work.


def test_bad_preparation_inputs_fail_before_any_work(tmp_path):
    folder = _folder(tmp_path / "images")
    with pytest.raises(prepare_data.PrepareError, match="inside --folder"):
        _prepare(folder, folder / "records")
    assert not (folder / "records").exists()
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    with pytest.raises(prepare_data.PrepareError, match="no image files"):
        _prepare(empty, tmp_path / "out")
    with pytest.raises(prepare_data.PrepareError, match="no class sub-directories"):
        _prepare(tmp_path / "empty" / "a", tmp_path / "out")
    with pytest.raises(prepare_data.PrepareError, match="already has train/ and test/"):
        _prepare(folder, tmp_path / "out", holdout=5)
    with pytest.raises(prepare_data.PrepareError, match="--shard_size must be >= 1"):
        _prepare(folder, tmp_path / "out", shard_size=0)
    assert not (tmp_path / "out").exists()
    _prepare(folder, tmp_path / "out", shard_size=5)
    other = _folder(tmp_path / "other")  # the same shard names, one file named otherwise
    os.rename(other / "train" / "cat" / "1.jpg", other / "train" / "cat" / "1b.jpg")
    with pytest.raises(prepare_data.PrepareError, match="shards of another preparation"):
        _prepare(other, tmp_path / "out", shard_size=5)
    with pytest.raises(prepare_data.PrepareError, match="shards this preparation would not"):
        _prepare(folder, tmp_path / "out", shard_size=4)  # other shard names in the same --out
    with pytest.raises(prepare_data.PrepareError, match="--process_count must be >= 1"):
        _prepare(folder, tmp_path / "out2", process_count=0)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(prepare_data.PrepareError, match="exists and is not a directory"):
        _prepare(folder, tmp_path / "a_file")


def test_command_line_reports_a_bad_folder_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vit_jax.prepare_data",
            f"--folder={tmp_path / 'missing'}",
            f"--out={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    # one line, without TensorFlow's native start-up notices
    assert result.stderr == (
        f"prepare_data: error: --folder='{tmp_path / 'missing'}' is not a directory.\n"
    )


def test_bad_records_directories_get_one_clear_error(prepared, tmp_path):
    _, out, *_ = prepared

    def error(directory, split="train"):
        with pytest.raises(rf.RecordsError) as raised:
            records_source.records_source(str(directory), split, 0, 1)
        return str(raised.value)

    assert "does not exist" in error(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    assert "no manifest.json and no shards" in error(tmp_path / "plain")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert "splits ['test', 'train'], not 'validation'" in error(copy, "validation")
    manifest = json.loads((copy / rf.MANIFEST).read_text())
    manifest["version"] = rf.VERSION + 1
    (copy / rf.MANIFEST).write_text(json.dumps(manifest))
    assert f"format version {rf.VERSION + 1}; this vit_jax reads version {rf.VERSION}" in error(
        copy
    )
    shutil.copy(out / rf.MANIFEST, copy / rf.MANIFEST)
    os.remove(copy / "train-00003-of-00009.array_record")
    message = error(copy)
    assert "lacks 1 of the 9 shard files of split 'train'" in message
    assert "train-00003-of-00009.array_record" in message
    os.remove(copy / rf.MANIFEST)
    assert "preparation did not finish" in error(copy)
    (copy / rf.MANIFEST).write_text("{not json")
    assert "cannot be read" in error(copy)


# ----------------------------------------------------------------------------------------------
# Training from records.


def _digits_folder(root):
    """The embedded digits as 8×8 PNG files: train/<digit>/*.png and test/<digit>/*.png."""
    for split in ("train", "test"):
        images, labels = indexed_sources._digits_split(split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            directory = root / split / str(label)
            directory.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(directory / f"{i:04d}.png")
    return root


# Measured (2026-12-07, AVX2-only kind: 2-core AMD EPYC without AVX512, 8 fake devices):
# test_learns.py's digits run with its crop (50–100 %, warmup 20), shortened to 300 steps of
# batch 64, reading the digits as PNG records, seeds 0, 1, 2: test accuracy 0.8361, 0.8528,
# 0.8278 (13 s each once compiled). Batch 128 with the default 5–100 % crop gave 0.8056 (seed
# 0) in 20 s; batch 64 with that crop 0.74–0.77. The floor, 0.78, is 17 test examples below
# the worst seed; a run that learns nothing scores about 0.1.
RECORDS_STEPS = 300
RECORDS_BATCH = 64
RECORDS_ACCURACY_FLOOR = 0.78
RECORDS_RESUME_STEP = 290  # mid-epoch: an epoch is 1437 / 64 = 22.5 steps


@pytest.mark.optimized  # hundreds of steps: running, not compiling, is its time
def test_training_from_records_learns_and_resumes_mid_epoch_bit_identically(tmp_path):
    out = tmp_path / "records"
    _prepare(_digits_folder(tmp_path / "digits"), out, shard_size=256)
    config = learning_config()
    config.update(
        dataset=f"records:{out}",
        batch_size=RECORDS_BATCH,
        total_steps=RECORDS_STEPS,
        warmup_steps=20,
        crop_min_area=0.5,
        log_every=RECORDS_STEPS,
        checkpoint_every=RECORDS_RESUME_STEP // 2,  # and the last step
        keep_checkpoints=2,
    )
    state, metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["count"] == 360
    assert metrics["accuracy"] >= RECORDS_ACCURACY_FLOOR, metrics

    # Killed after the checkpoint of step RECORDS_RESUME_STEP (not a multiple of the epoch's
    # 22.5 steps): the rerun resumes there, mid-epoch, and ends bit-identical.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed_dir)
    shutil.rmtree(resumed_dir / train.CHECKPOINT_DIR / str(RECORDS_STEPS))
    os.remove(resumed_dir / train.PARAMS_FILE)
    resumed, resumed_metrics = train.train_and_evaluate(config, str(resumed_dir))
    log = (resumed_dir / train.LOG_FILE).read_text()
    assert f"Resuming from the checkpoint of step {RECORDS_RESUME_STEP}" in log
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed_metrics == metrics
    loaded = checkpoint.load(resumed_dir / train.PARAMS_FILE)
    assert len(jax.tree.leaves(loaded)) == len(jax.tree.leaves(state.params))
