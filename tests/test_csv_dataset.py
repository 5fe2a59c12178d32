"""Tests for vit_jax.csv_dataset and the 'csv:' source of vit_jax.input_pipeline.

Images are tiny flat-grey JPEGs whose grey level encodes the row (`_grey`), so a batch's image
says which row it came from and its target/features can be checked against the CSV.
"""

import csv
import dataclasses
import logging

import numpy as np
import pytest
from PIL import Image

from vit_jax import csv_dataset, indexed_sources
from vit_jax import input_pipeline as ip
from vit_jax.csv_dataset import CsvSpec

META = (
    "Subject Focus",
    "Eyes",
    "Face",
    "Near",
    "Action",
    "Accessory",
    "Group",
    "Collage",
    "Human",
    "Occlusion",
    "Info",
    "Blur",
)
ROWS = 42  # folds of 9, 9, 8, 8, 8


def _grey(row):
    """Row k's grey level: 3 apart, so ±1 of JPEG rounding still names the row."""
    return 10 + 3 * row


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _image(path, grey):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), grey, np.uint8)).save(path, quality=95)


def _pawpularity(root, n=ROWS, seed=0):
    """The Kaggle layout: train.csv (Id, 12 metadata, Pawpularity) + train/<Id>.jpg, and
    test.csv (no target) + test/<Id>.jpg. Returns {id: (row, metadata, pawpularity)}."""
    rng = np.random.default_rng(seed)
    rows = {}
    for k in range(n):
        ident = f"{rng.integers(16**12):012x}"
        rows[ident] = (k, rng.integers(0, 2, len(META)), int(rng.integers(1, 101)))
        _image(root / "train" / f"{ident}.jpg", _grey(k))
    _write_csv(
        root / "train.csv",
        ["Id", *META, "Pawpularity"],
        [[i, *meta, paw] for i, (_, meta, paw) in rows.items()],
    )
    _write_csv(root / "test.csv", ["Id", *META], [["t0", *[0] * 12], ["t1", *[1] * 12]])
    for i in range(2):
        _image(root / "test" / f"t{i}.jpg", 128)
    return rows


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("petfinder")
    return f"csv:{root / 'train.csv'}", _pawpularity(root)


SPEC = CsvSpec(feature_columns=META)
VALUE = dict(targets="value", csv=SPEC)
_SMALL = dict(image_size=8, global_batch_size=8, local_device_count=4)
_VAL = dict(targets="value")


def _eval(dataset, split="validation", **kw):
    args = dict(image_size=8, global_batch_size=8, local_device_count=4) | VALUE
    return ip.get_eval_iterator(dataset, split, **(args | kw))


def _train(dataset, **kw):
    args = dict(image_size=8, global_batch_size=8, local_device_count=4, seed=0) | VALUE
    return ip.get_train_iterator(dataset, "train", **(args | kw))


def _real(batches):
    """(row of each real example by its grey level, its targets, features; padded count)."""
    rows, targets, features, padded = [], [], [], 0
    for batch in batches:
        mask = batch["mask"].reshape(-1)
        image = batch["image"].reshape(mask.size, -1)
        target = batch["target"].reshape(mask.size, -1)
        feature = batch["features"].reshape(mask.size, -1)
        assert not target[mask == 0].any() and not feature[mask == 0].any()
        grey = (image[mask == 1].mean(-1) + 1) * 127.5
        rows += list(np.round((grey - 10) / 3).astype(int))
        targets += list(target[mask == 1])
        features += list(feature[mask == 1])
        padded += int((mask == 0).sum())
    return rows, np.array(targets), np.array(features), padded


def _by_row(rows):
    return {k: (meta, paw) for k, meta, paw in rows.values()}


# ----------------------------------------------------------------------------------------------
# The Pawpularity layout through the pipeline.


def test_pawpularity_reads_targets_and_features_per_image(pets):
    dataset, rows = pets
    info = ip.get_dataset_info(
        dataset, train_split="train", test_split="validation", targets="value", csv=SPEC
    )
    assert info.target_names == ("Pawpularity",) and info.num_features == 12
    assert info.num_classes == 0 and info.class_names is None
    assert info.num_examples == {"train": 33, "validation": 9}
    by_row = _by_row(rows)
    seen = []
    for split in ("validation", "train"):
        got, targets, features, _ = _real(_eval(dataset, split))
        seen += got
        for k, target, feature in zip(got, targets, features, strict=True):
            meta, paw = by_row[k]
            assert target.tolist() == [paw]
            assert feature.tolist() == meta.tolist()
        if split == "train":  # stats over the train split's targets
            paws = np.array([by_row[k][1] for k in got], np.float64)
            expected = [paws.mean(), paws.std(), paws.min(), paws.max()]
            assert [info.target_stats[s][0] for s in ("mean", "std", "min", "max")] == (
                pytest.approx(expected)
            )
    assert sorted(seen) == list(range(ROWS))  # each row once, in one of the two splits
    test_csv = dataset.replace("train.csv", "test.csv")  # Kaggle's test.csv: no target column
    with pytest.raises(ValueError, match=r"test\.csv' has no column\(s\) \['Pawpularity'\]"):
        _eval(test_csv, "train")
    # Without feature columns the batches carry no 'features'.
    batch = next(iter(_eval(dataset, csv=CsvSpec())))
    assert sorted(batch) == ["image", "mask", "target"]
    assert batch["target"].shape == (4, 2, 1) and batch["target"].dtype == np.float32


def test_eval_counts_every_validation_row_once(pets):
    dataset, _ = pets
    batches = _eval(dataset)  # 9 rows, batches of 8: 2 batches, 7 padded
    got, _, _, padded = _real(batches)
    assert len(batches) == 2 and len(got) == 9 and padded == 7
    assert len(set(got)) == 9
    parts = [_eval(dataset, local_device_count=2, process_index=i, process_count=2) for i in (0, 1)]
    assert [len(p) for p in parts] == [2, 2]  # ceil(5 / 4): no process waits on the other
    two = [_real(p)[0] for p in parts]
    assert [len(x) for x in two] == [5, 4]
    assert sorted(two[0] + two[1]) == sorted(got)


def test_train_batches_do_not_depend_on_the_process_count(pets):
    dataset, _ = pets
    one = _train(dataset)
    two = [_train(dataset, local_device_count=2, process_index=i, process_count=2) for i in (0, 1)]
    for _ in range(9):  # 9 × 8 = 72 > 2 epochs of 33
        whole, parts = next(one), [next(t) for t in two]
        assert sorted(whole) == ["features", "image", "target"]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


def test_train_resumes_by_step(pets):
    dataset, rows = pets
    stream = [next(it) for it in [_train(dataset, seed=3)] for _ in range(6)]
    resumed = _train(dataset, seed=3, start_step=4)
    for expected in stream[4:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])
    validation = set(_real(_eval(dataset))[0])  # training never sees a validation row
    by_row = _by_row(rows)
    paws = {by_row[k][1] for k in range(ROWS) if k not in validation}
    assert set(np.concatenate([b["target"].reshape(-1) for b in stream]).tolist()) <= paws


def test_unreadable_image_is_skipped_and_reported_once(tmp_path, caplog):
    rows = _pawpularity(tmp_path, n=12)
    broken = next(i for i, (k, _, _) in rows.items() if k == 3)
    (tmp_path / "train" / f"{broken}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    spec = dataclasses.replace(SPEC, num_folds=0)  # every row is 'train'
    dataset = f"csv:{tmp_path / 'train.csv'}"
    with caplog.at_level(logging.WARNING):
        info = ip.get_dataset_info(
            dataset, train_split="train", test_split="train", targets="value", csv=spec
        )
        got, _, _, _ = _real(_eval(dataset, "train", csv=spec))
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 " in warnings[0] and broken in warnings[0]
    assert info.num_examples == {"train": 11}
    assert sorted(got) == [k for k in range(12) if k != 3]
    with pytest.raises(ValueError, match=r"has no 'validation' split.*num_folds=0"):
        _eval(dataset, csv=spec)


# ----------------------------------------------------------------------------------------------
# Folds (the CSV alone: no images needed).


def _table(tmp_path, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    rows = [[f"id{k}", int(rng.integers(1, 101))] for k in range(n)]
    path = _write_csv(tmp_path / "big.csv", ["Id", "Pawpularity"], rows)
    return csv_dataset.read_table(str(path), CsvSpec())


def test_folds_are_disjoint_complete_stratified_and_seeded(tmp_path):
    table = _table(tmp_path)
    targets = table.targets[:, 0]
    assert table.ids[:2] == ("id0", "id1") and table.lines[:2] == (2, 3)
    folds = [csv_dataset.split_rows(table, CsvSpec(fold=k)) for k in range(5)]
    validation = [f["validation"] for f in folds]
    assert [len(v) for v in validation] == [400] * 5
    assert sorted(np.concatenate(validation).tolist()) == list(range(2000))  # disjoint, complete
    for f in folds:
        assert sorted([*f["train"], *f["validation"]]) == list(range(2000))
    # Stratified: each fold's mean within 0.4 of the whole (measured: 0.005-0.27); unstratified
    # folds (sklearn's KFold, same seed) of the same rows are off by 0.04-1.52.
    assert targets.std() > 28
    for v in validation:
        assert abs(targets[v].mean() - targets.mean()) < 0.4
        assert targets[v].min() <= 2 and targets[v].max() >= 99
    again = csv_dataset.split_rows(table, CsvSpec(fold=2))["validation"]
    np.testing.assert_array_equal(again, validation[2])
    other = csv_dataset.split_rows(table, CsvSpec(fold=2, split_seed=1))["validation"]
    assert len(other) == 400 and len(set(other) & set(validation[2])) < 150  # 87 (80 by chance)
    held = csv_dataset.split_rows(table, CsvSpec(num_folds=0, holdout_fraction=0.25))
    assert len(held["validation"]) == 500 and len(held["train"]) == 1500
    assert not set(held["validation"]) & set(held["train"])
    assert abs(targets[held["validation"]].mean() - targets.mean()) < 0.4
    assert list(csv_dataset.split_rows(table, CsvSpec(num_folds=0))) == ["train"]


# ----------------------------------------------------------------------------------------------
# Bad inputs: one error naming the file, the column and the rows.


def _read(tmp_path, header, rows, spec=SPEC):
    path = _write_csv(tmp_path / "train.csv", header, rows)
    return csv_dataset.read_table(str(path), spec)


def _row(ident, paw=50, meta=(0,) * 12):
    return [ident, *meta, paw]


HEADER = ["Id", *META, "Pawpularity"]


def test_bad_columns_and_values_name_file_column_and_lines(tmp_path):
    where = str(tmp_path / "train.csv")
    with pytest.raises(ValueError, match=r"no column\(s\) \['Pawpularity'\]; its columns are"):
        _read(tmp_path, HEADER[:-1], [_row("a")[:-1]])
    with pytest.raises(ValueError, match=r"no column\(s\) \['Id'\].*'Image', 'Subject Focus'"):
        _read(tmp_path, ["Image", *HEADER[1:]], [_row("a")])
    with pytest.raises(ValueError, match=r"no column\(s\) \['Blur'\]"):
        _read(tmp_path, [*HEADER[:-2], "Pawpularity"], [[*_row("a")[:-2], 3]])
    rows = [_row(f"r{k}", paw="x" if k in (1, 4) else ("" if k == 6 else k)) for k in range(9)]
    with pytest.raises(ValueError) as err:
        _read(tmp_path, HEADER, rows)
    message = str(err.value)
    assert where in message and "'Pawpularity' has 3 non-numeric, empty" in message
    assert "line 3: 'x', line 6: 'x', line 8: ''" in message and "header as line 1" in message
    with pytest.raises(ValueError, match=r"'Eyes' has 1 non-numeric.*line 3: 'yes'"):
        _read(tmp_path, HEADER, [_row("a"), _row("b", meta=(0, "yes", *[0] * 10))])
    with pytest.raises(ValueError, match=r"'Pawpularity' has 1 .*line 2: 'nan'"):
        _read(tmp_path, HEADER, [_row("a", paw="nan")])
    rows = [_row(i) for i in ("a", "b", "a", "c", "b", "a")]
    with pytest.raises(ValueError, match=r"2 duplicate id\(s\): 'a' \(lines 2, 4, 7\), 'b' "):
        _read(tmp_path, HEADER, rows)
    with pytest.raises(ValueError, match=r"'Id' is empty in 1 row\(s\): line 3"):
        _read(tmp_path, HEADER, [_row("a"), _row(" ")])
    with pytest.raises(ValueError, match=r"1 row\(s\) do not have the header's 14 fields: line 3"):
        _read(tmp_path, HEADER, [_row("a"), ["b", 1]])
    with pytest.raises(FileNotFoundError, match=r"missing\.csv' does not exist"):
        csv_dataset.read_table(str(tmp_path / "missing.csv"), SPEC)


def test_images_and_rows_must_match(tmp_path):
    ids = [f"p{k}" for k in range(7)]
    table = _read(tmp_path, HEADER, [_row(i) for i in ids])
    with pytest.raises(FileNotFoundError, match=r"Image directory .*/train' of CSV file"):
        csv_dataset.image_paths(table, SPEC)
    for i in ids[:6]:
        _image(tmp_path / "train" / f"{i}.jpg", 50)
    with pytest.raises(FileNotFoundError) as err:
        csv_dataset.image_paths(table, SPEC)
    assert f"1 id(s) have no image file: 'p6' (line 8: {tmp_path}/train/p6.jpg)" in str(err.value)
    for name in ("p6.jpg", "stray.jpg", "p1.png"):
        _image(tmp_path / "train" / name, 50)
    with pytest.raises(ValueError, match=r"has 2 file\(s\) without a row .*: p1.png, stray.jpg"):
        csv_dataset.image_paths(table, SPEC)
    (tmp_path / "train" / "stray.jpg").unlink()
    (tmp_path / "train" / "p1.png").unlink()
    assert csv_dataset.image_paths(table, SPEC)[6] == f"{tmp_path}/train/p6.jpg"
    many = _read(tmp_path / "many", HEADER, [_row(f"q{k}") for k in range(8)])
    (tmp_path / "many" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"8 id\(s\) have no image.*'q4' .*and 3 more"):
        csv_dataset.image_paths(many, SPEC)


def test_spec_errors():
    for kw, text in [
        (dict(fold=5), r"fold=5 is outside 0 … 4"),
        (dict(fold=-1), r"fold=-1 is outside 0 … 4"),
        (dict(num_folds=1), r"num_folds=1 is not valid: use K ≥ 2"),
        (dict(num_folds=-2), r"num_folds=-2 is not valid"),
        (dict(num_folds=0, holdout_fraction=1.0), r"holdout_fraction=1.0 is outside \[0, 1\)"),
        (dict(num_folds=0, holdout_fraction=-0.1), r"holdout_fraction=-0.1 is outside"),
        (dict(holdout_fraction=0.2), r"used only with num_folds=0"),
        (dict(target_columns="Pawpularity"), r"got the string 'Pawpularity': write"),
        (dict(target_columns=()), r"target_columns is empty"),
        (dict(feature_columns=("Pawpularity",)), r"\['Pawpularity'\] are targets and also"),
        (dict(stratify_bins=0), r"stratify_bins=0 must be ≥ 1"),
    ]:
        with pytest.raises(ValueError, match=text):
            CsvSpec(**kw)
    assert CsvSpec(feature_columns=["Eyes"]).feature_columns == ("Eyes",)


def test_targets_kind_errors(pets):
    dataset, _ = pets
    with pytest.raises(ValueError, match=r"has regression targets \(Pawpularity\).*'regression'"):
        _eval(dataset, targets="one_hot")
    with pytest.raises(ValueError, match="has regression targets"):
        ip.get_dataset_info(dataset, train_split="train", test_split="validation")
    with pytest.raises(ValueError, match="Unknown targets 'values'; valid values: one_hot, multi"):
        _train(dataset, targets="values")
    with pytest.raises(ValueError, match=r"has splits \('train', 'validation'\), got 'test'"):
        _eval(dataset, "test")


# ----------------------------------------------------------------------------------------------
# targets='value' on class-labelled sources.


def test_digits_value_targets_are_the_labels():
    info = ip.get_dataset_info(
        "sklearn_digits", train_split="train", test_split="test", targets="value"
    )
    train_labels = indexed_sources._digits_split("train")[1]
    assert info.target_names == ("label",) and info.num_classes == 10
    assert info.target_stats["mean"] == pytest.approx((train_labels.mean(),))
    assert info.target_stats["min"] == (0.0,) and info.target_stats["max"] == (9.0,)
    batches = ip.get_eval_iterator(
        "sklearn_digits",
        "test",
        image_size=8,
        global_batch_size=64,
        local_device_count=8,
        targets="value",
    )
    targets = np.concatenate([b["target"].reshape(-1)[b["mask"].reshape(-1) == 1] for b in batches])
    np.testing.assert_array_equal(targets, indexed_sources._digits_split("test")[1])
    batch = next(ip.get_train_iterator("sklearn_digits", "train", seed=0, **_SMALL, **_VAL))
    assert sorted(batch) == ["image", "target"] and batch["target"].shape == (4, 2, 1)


def test_tfds_value_stats_cover_the_whole_train_split():
    """Every process reads all train labels (not its own part) for the same target_stats."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        source = ip._load_source("mnist", "train")
        labels = np.array([x["label"] for x in source.dataset.as_numpy_iterator()], np.float64)
        infos = [
            ip.get_dataset_info(
                "mnist",
                train_split="train",
                test_split="test",
                targets="value",
                process_index=i,
                process_count=2,
            )
            for i in (0, 1)
        ]
    assert len(labels) == 12 and labels.std() > 0
    assert infos[0].target_stats == infos[1].target_stats
    assert infos[0].target_stats["mean"] == pytest.approx((labels.mean(),))
    assert infos[0].target_stats["std"] == pytest.approx((labels.std(),))


def test_class_names_must_be_numbers_for_value(tmp_path):
    for split in ("train", "test"):
        for name, grey in (("1", 20), ("5", 200)):
            _image(tmp_path / "ratings" / split / name / "a.jpg", grey)
            _image(tmp_path / "pets" / split / ("cat" if name == "1" else "dog") / "a.jpg", grey)
    batches = ip.get_eval_iterator(f"folder:{tmp_path / 'ratings'}", "test", **_SMALL, **_VAL)
    (batch,) = list(batches)
    real = batch["mask"].reshape(-1) == 1
    assert batch["target"].reshape(-1)[real].tolist() == [1.0, 5.0]
    with pytest.raises(ValueError, match="non-numeric class name 'cat'"):
        ip.get_eval_iterator(f"folder:{tmp_path / 'pets'}", "test", **_SMALL, **_VAL)
    assert csv_dataset.class_values("x", ("10", "2", "0.5")).tolist() == [10.0, 2.0, 0.5]
