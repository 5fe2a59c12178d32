"""Regression data from a CSV of per-image targets (the Kaggle PetFinder "Pawpularity" layout).

A CSV such as `<root>/train.csv` has one row per image: an id column, one or more numeric target
columns and, optionally, extra numeric per-image inputs (Pawpularity's 12 metadata columns); the
images are `<root>/train/<id>.jpg`.

This module owns:
- `CsvSpec`: which columns are the id, the targets and the features, where the images are, and how
  the rows are split into 'train' and 'validation' (seeded stratified K-fold, or a seeded held-out
  fraction, or no validation split);
- reading the CSV (stdlib `csv`) and validating it: each bad input is one error naming the file,
  the column and the first offending lines with their count;
- matching rows to image files: an id without an image, or an image without a row, is an error
  (a typo in one would otherwise silently change the data); an unreadable image file is skipped,
  counted and reported once, judged by the caller's decoder check, i.e. the image folders' one, so
  that a file goes through the same decoder whichever source lists it;
- regression targets elsewhere: the target statistics of a split (`target_stats`), and the
  numeric value of class names (`class_values`: a class-labelled source read as regression).

Folds depend on the CSV alone (not on which images decode), so a corrupt file never moves another
row to another fold.

It does not own batching or preprocessing (`vit_jax.input_pipeline`, where a CSV is the source
`'csv:/path/train.csv'`), the per-process split (`vit_jax.indexed_sources`), nor decoding
(`vit_jax.image_folder`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

CSV_PREFIX = "csv:"  # a dataset 'csv:/path/train.csv' is read by this module
SPLITS = ("train", "validation")
_SHOWN = 5  # offending rows/files named in an error, before "… and N more"
_LINES = "line numbers count the header as line 1"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CsvSpec:
    """How to read one CSV of per-image targets and split its rows.

    Fields:
      id_column: the column naming each row's image: `<image_dir>/<id><image_ext>`.
      target_columns: the numeric columns to predict (`target` float32 [T] in the batches).
      feature_columns: extra numeric per-image inputs (`features` float32 [F]), e.g. the 12
        Pawpularity metadata columns; () for none.
      image_dir: the images' directory; '' = the CSV's path without its extension
        (`<root>/train.csv` → `<root>/train/`); a relative path is relative to the CSV's directory.
      image_ext: appended to each id to name its file.
      num_folds: K ≥ 2: 'validation' is fold `fold` of a K-fold split, 'train' the other K − 1.
        0: no folds; `holdout_fraction` of the rows is 'validation' (0: no validation split).
      fold: which of the K folds is 'validation' (0 … K − 1).
      holdout_fraction: with num_folds=0, the seeded fraction of rows held out, in [0, 1).
      stratify_bins: folds (and the held-out rows) are stratified over this many equal-count
        quantile bins of the first target, so every fold sees the whole range of targets.
      split_seed: seeds the folds / held-out rows (the same seed gives the same split).
    """

    id_column: str = "Id"
    target_columns: tuple[str, ...] = ("Pawpularity",)
    feature_columns: tuple[str, ...] = ()
    image_dir: str = ""
    image_ext: str = ".jpg"
    num_folds: int = 5
    fold: int = 0
    holdout_fraction: float = 0.0
    stratify_bins: int = 10
    split_seed: int = 0

    def __post_init__(self):
        for name in ("target_columns", "feature_columns"):
            value = getattr(self, name)
            if isinstance(value, str):  # ('Pawpularity') is a string, not a 1-tuple
                raise ValueError(
                    f"CsvSpec.{name} must be a tuple of column names, got the string {value!r}: "
                    f"write ({value!r},)."
                )
            object.__setattr__(self, name, tuple(value))  # lists too; hashable (cache keys)
        if not self.target_columns:
            raise ValueError("CsvSpec.target_columns is empty: name at least one target column.")
        leaked = sorted(set(self.target_columns) & {*self.feature_columns, self.id_column})
        if leaked:
            raise ValueError(
                f"CsvSpec: column(s) {leaked} are targets and also the id or features: a model "
                "given its target as input learns nothing. Remove them from feature_columns."
            )
        if self.num_folds < 0 or self.num_folds == 1:
            raise ValueError(
                f"CsvSpec.num_folds={self.num_folds} is not valid: use K ≥ 2 for K-fold "
                "cross-validation, or 0 for a held-out fraction (holdout_fraction) or none."
            )
        if self.num_folds >= 2 and not 0 <= self.fold < self.num_folds:
            raise ValueError(
                f"CsvSpec.fold={self.fold} is outside 0 … {self.num_folds - 1} "
                f"(num_folds={self.num_folds})."
            )
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(
                f"CsvSpec.holdout_fraction={self.holdout_fraction} is outside [0, 1): the "
                "fraction of rows held out for validation (with num_folds=0)."
            )
        if self.num_folds >= 2 and self.holdout_fraction:
            raise ValueError(
                f"CsvSpec.holdout_fraction={self.holdout_fraction} is used only with num_folds=0; "
                f"with num_folds={self.num_folds} 'validation' is fold {self.fold}. Set one of "
                "them."
            )
        if self.stratify_bins < 1:
            raise ValueError(f"CsvSpec.stratify_bins={self.stratify_bins} must be ≥ 1.")


@dataclasses.dataclass(frozen=True)
class CsvTable:
    """A CSV's validated rows, in file order (no images looked at)."""

    path: str
    ids: tuple[str, ...]
    lines: tuple[int, ...]  # each row's line in the file (the header is line 1)
    targets: np.ndarray  # float32 [N, T]
    features: np.ndarray  # float32 [N, F]


@dataclasses.dataclass(frozen=True)
class CsvSplit:
    """One split's readable images, their decoder verdicts, targets and features."""

    paths: np.ndarray  # str [n]
    tf_decodes: np.ndarray  # bool [n]: TF's decoder reads the file (else Pillow's path)
    targets: np.ndarray  # float32 [n, T]
    features: np.ndarray  # float32 [n, F]


@dataclasses.dataclass(frozen=True)
class CsvData:
    """A validated CSV dataset: its splits ('train', and 'validation' unless there is none)."""

    path: str
    spec: CsvSpec
    splits: dict[str, CsvSplit]

    def split(self, name: str) -> CsvSplit:
        """The split called `name`; an unknown or absent split is an error saying why."""
        if name not in SPLITS:
            raise ValueError(f"CSV dataset {self.path!r} has splits {SPLITS}, got {name!r}.")
        if name not in self.splits:
            raise ValueError(
                f"CSV dataset {self.path!r} has no 'validation' split: num_folds=0 and "
                "holdout_fraction=0 put every row in 'train'. Set CsvSpec.num_folds=K (≥ 2) for "
                "K-fold or holdout_fraction in (0, 1) for a held-out part."
            )
        return self.splits[name]


def load(
    path: str, spec: CsvSpec, decoders: Callable[[list[str]], Sequence[bool | None]]
) -> CsvData:
    """The CSV's rows matched to their images, split, unreadable images left out.

    `decoders(paths)` judges each image file: True (TF's decoder reads it), False (Pillow's path)
    or None (unreadable: skipped, and all of them reported in one warning).
    """
    table = read_table(path, spec)
    rows_of = split_rows(table, spec)
    paths = image_paths(table, spec)
    verdicts = list(decoders(paths))
    skipped = [p for p, v in zip(paths, verdicts, strict=True) if v is None]
    if skipped:
        _LOG.warning(
            "CSV dataset %s: skipped %d unreadable or non-image file(s), e.g. %s",
            path,
            len(skipped),
            ", ".join(skipped[:_SHOWN]),
        )
    splits = {}
    for name, rows in rows_of.items():
        rows = np.array([r for r in rows if verdicts[r] is not None], np.int64)
        if not len(rows):
            raise ValueError(f"CSV dataset {path!r}: its {name!r} split has no readable images.")
        splits[name] = CsvSplit(
            np.array(paths)[rows],
            np.array([verdicts[r] for r in rows], bool),
            table.targets[rows],
            table.features[rows],
        )
    return CsvData(path, spec, splits)


def read_table(path: str, spec: CsvSpec) -> CsvTable:
    """The CSV's ids, targets and features, validated; errors name the file, column and lines."""
    return _read(path, spec.id_column, spec.target_columns, spec.feature_columns)


def read_features(
    path: str, id_column: str, feature_columns: Sequence[str]
) -> dict[str, np.ndarray]:
    """`{id: float32 [F]}` of a CSV that need not have targets (Kaggle's `test.csv`).

    What `predict` feeds a head trained with feature columns; validated as `read_table` does.
    """
    table = _read(path, id_column, (), tuple(feature_columns))
    return dict(zip(table.ids, table.features, strict=True))


def _read(
    path: str, id_column: str, target_columns: Sequence[str], feature_columns: Sequence[str]
) -> CsvTable:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file {path!r} does not exist.")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        rows, lines = [], []
        for row in reader:
            if any(cell.strip() for cell in row):  # blank lines are no rows
                rows.append(row)
                lines.append(reader.line_num)
    wanted = (id_column, *target_columns, *feature_columns)
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ValueError(
            f"CSV file {path!r} has no column(s) {missing}; its columns are {header}. Set "
            "CsvSpec.id_column / target_columns / feature_columns to names in its header."
        )
    twice = sorted({name for name in wanted if header.count(name) > 1})
    if twice:
        raise ValueError(f"CSV file {path!r} has column(s) {twice} more than once in its header.")
    if not rows:
        raise ValueError(f"CSV file {path!r} has a header but no rows.")
    ragged = [line for row, line in zip(rows, lines, strict=True) if len(row) != len(header)]
    if ragged:
        raise ValueError(
            f"CSV file {path!r}: {len(ragged)} row(s) do not have the header's {len(header)} "
            f"fields: {_listed([f'line {n}' for n in ragged])} ({_LINES})."
        )
    where = {name: header.index(name) for name in wanted}
    ids = tuple(row[where[id_column]].strip() for row in rows)
    _check_ids(path, id_column, ids, lines)
    return CsvTable(
        path,
        ids,
        tuple(lines),
        _numbers(path, rows, lines, [where[c] for c in target_columns], target_columns),
        _numbers(path, rows, lines, [where[c] for c in feature_columns], feature_columns),
    )


def split_rows(table: CsvTable, spec: CsvSpec) -> dict[str, np.ndarray]:
    """Sorted row indices of 'train' and 'validation' (absent when there is no validation split).

    K-fold: scikit-learn's `StratifiedKFold` (shuffled, seeded) over quantile bins of the first
    target; the held-out fraction: `StratifiedShuffleSplit` over the same bins. Bins are equal-count
    (by rank, ties in file order), as many as `stratify_bins` allows while each bin still has a
    member for every fold (K-fold) or two members (held out) — so no fold misses a range.
    """
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    n = len(table.ids)
    first = table.targets[:, 0]
    if spec.num_folds >= 2:
        if n < spec.num_folds:
            raise ValueError(
                f"CSV file {table.path!r} has {n} row(s), fewer than num_folds={spec.num_folds}."
            )
        strata = _strata(first, min(spec.stratify_bins, n // spec.num_folds))
        folds = StratifiedKFold(spec.num_folds, shuffle=True, random_state=spec.split_seed)
        train, validation = list(folds.split(np.zeros(n), strata))[spec.fold]
    elif spec.holdout_fraction > 0:
        held = round(spec.holdout_fraction * n)
        if not 0 < held < n:
            raise ValueError(
                f"CsvSpec.holdout_fraction={spec.holdout_fraction} of the {n} row(s) of CSV file "
                f"{table.path!r} holds out {held}: choose a fraction that leaves rows in both."
            )
        bins = max(1, min(spec.stratify_bins, held, n - held, n // 2))
        split = StratifiedShuffleSplit(1, test_size=held, random_state=spec.split_seed)
        train, validation = next(split.split(np.zeros(n), _strata(first, bins)))
    else:
        return {"train": np.arange(n)}
    return {"train": np.sort(train), "validation": np.sort(validation)}


def image_dir(csv_path: str, spec: CsvSpec) -> str:
    """Where the CSV's images are (see `CsvSpec.image_dir`)."""
    if not spec.image_dir:
        return os.path.splitext(csv_path)[0]
    return os.path.join(os.path.dirname(csv_path), spec.image_dir)  # an absolute one stays


def image_paths(table: CsvTable, spec: CsvSpec) -> list[str]:
    """Each row's image file; an id without a file and a file without a row are errors."""
    directory = image_dir(table.path, spec)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Image directory {directory!r} of CSV file {table.path!r} does not exist: each row's "
            f"image is <image_dir>/<{spec.id_column}>{spec.image_ext}, image_dir by default the "
            "CSV's path without its extension. Set CsvSpec.image_dir."
        )
    # Here, not at the top: image_folder imports TensorFlow, and checking a config's CsvSpec
    # (`run_config.validate_config`) runs before a command imports it.
    from vit_jax import image_folder

    present = {
        e.name for e in image_folder.scan_dir(directory) if not e.is_dir() and e.name[0] != "."
    }
    names = [i + spec.image_ext for i in table.ids]
    absent = [
        f"{i!r} (line {line}: {os.path.join(directory, name)})"
        for i, name, line in zip(table.ids, names, table.lines, strict=True)
        if name not in present
    ]
    if absent:
        raise FileNotFoundError(
            f"CSV file {table.path!r}: {len(absent)} id(s) have no image file: "
            f"{_listed(absent)}. Add the images, drop the rows, or set CsvSpec.image_dir / "
            "image_ext."
        )
    extra = sorted(present - set(names))
    if extra:
        raise ValueError(
            f"Image directory {directory!r} has {len(extra)} file(s) without a row in CSV file "
            f"{table.path!r}: {_listed(extra)}. Add their rows (id = the file name without "
            f"{spec.image_ext!r}) or move the files out."
        )
    return [os.path.join(directory, name) for name in names]


def target_stats(targets: np.ndarray) -> dict[str, tuple[float, ...]]:
    """'mean', 'std' (population), 'min' and 'max' of each target column of float [N, T]."""
    values = np.asarray(targets, np.float64)
    return {
        name: tuple(float(x) for x in reduce(values, axis=0))
        for name, reduce in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))
    }


def class_values(dataset: str, class_names: Sequence[str] | None) -> np.ndarray:
    """float32 [C]: each class name as a number ('0' … '9' → 0 … 9), the target of a class
    under `targets='value'` (a folder of ratings '1' … '5'); a non-numeric name is an error."""
    values = []
    for name in class_names or ():
        try:
            values.append(float(name))
        except ValueError:
            values.append(math.nan)
        if not math.isfinite(values[-1]):
            raise ValueError(
                f"targets='value' regresses on the numeric value of each class name, but dataset "
                f"{dataset!r} has the non-numeric class name {name!r}. Name the classes by their "
                "values (e.g. folders '1' … '5'), or use targets='one_hot'."
            )
    if not values:
        raise ValueError(f"Dataset {dataset!r} has no class names for targets='value' to read.")
    return np.array(values, np.float32)


def _check_ids(path: str, column: str, ids: Sequence[str], lines: Sequence[int]) -> None:
    empty = [f"line {line}" for i, line in zip(ids, lines, strict=True) if not i]
    if empty:
        raise ValueError(
            f"CSV file {path!r}: column {column!r} is empty in {len(empty)} row(s): "
            f"{_listed(empty)} ({_LINES})."
        )
    where = collections.defaultdict(list)
    for i, line in zip(ids, lines, strict=True):
        where[i].append(line)
    repeated = [
        f"{i!r} (lines {', '.join(map(str, ls))})" for i, ls in where.items() if len(ls) > 1
    ]
    if repeated:
        raise ValueError(
            f"CSV file {path!r}: column {column!r} has {len(repeated)} duplicate id(s): "
            f"{_listed(repeated)} ({_LINES}). Each image needs exactly one row."
        )


def _numbers(
    path: str, rows: list[list[str]], lines: list[int], indices: list[int], columns: Sequence[str]
) -> np.ndarray:
    """float32 [N, len(columns)]; the first column with a bad value is one error naming them."""
    out = np.zeros([len(rows), len(columns)], np.float32)
    for j, (index, column) in enumerate(zip(indices, columns, strict=True)):
        bad = []
        for i, row in enumerate(rows):
            text = row[index].strip()
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if math.isfinite(value):
                out[i, j] = value
            else:
                bad.append(f"line {lines[i]}: {text!r}")
        if bad:
            raise ValueError(
                f"CSV file {path!r}: column {column!r} has {len(bad)} non-numeric, empty or "
                f"non-finite value(s): {_listed(bad)} ({_LINES}). Fix or drop those rows."
            )
    return out


def _strata(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-count quantile bin (0 … bins − 1) of each value, by rank (ties in file order)."""
    ranks = np.empty(len(values), np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks * bins // len(values)


def _listed(items: Sequence[str]) -> str:
    """The first few items, and how many more."""
    shown = ", ".join(items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown} … and {len(items) - _SHOWN} more"
