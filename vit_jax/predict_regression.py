"""Prediction with a regression checkpoint: each image's values in target units, and the
Kaggle submission file (`Id,<target>` per image).

`vit_jax.predict` calls this when the checkpoint's `task.json` (written by training beside
`params.npz`) says the task is regression: the head's outputs are turned into the target's
units with the offset, scale and output function training used (`tasks.regression.to_values`).
A head trained with feature columns (e.g. Pawpularity's metadata) also needs each image's
features: they are read from a CSV (`test.csv`) by the image's id, its file name without the
extension.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from vit_jax import checkpoint, csv_dataset, tasks
from vit_jax.tasks import regression


def read_task_info(checkpoint_path: str, task_info: str | None = None) -> dict[str, Any] | None:
    """The checkpoint's `task.json` (beside its params file), or `task_info` if given.

    None when there is none: a released checkpoint, or one trained before task files existed,
    is a classification checkpoint.
    """
    path = task_info or os.path.join(
        os.path.dirname(checkpoint.resolve_params_file(checkpoint_path)), tasks.INFO_FILE
    )
    if not os.path.exists(path):
        if task_info:
            raise FileNotFoundError(f"--task_info file {task_info!r} does not exist.")
        return None
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("task") not in tasks.TASKS:
        raise ValueError(f"{path!r} names task {info.get('task')!r}; known: {list(tasks.TASKS)}.")
    return info


def image_id(path: str) -> str:
    """The id of an image file: its name without the extension (`train/<Id>.jpg` → Id)."""
    return os.path.splitext(os.path.basename(path))[0]


def features_by_id(
    paths: Sequence[str], info: Mapping[str, Any], features_csv: str | None
) -> np.ndarray | None:
    """float32 [N, F] features of the images, read from `features_csv`; None if not needed.

    A head trained with features needs them for every image: an image whose id has no row is
    an error naming the first few.
    """
    columns = info.get("feature_columns") or []
    if not columns:
        return None
    if not features_csv:
        raise ValueError(
            f"This regression head also reads the feature columns {columns}: pass "
            "--features_csv=<CSV with an id column and those columns> (e.g. Kaggle's test.csv)."
        )
    table = csv_dataset.read_features(features_csv, info["id_column"], columns)
    missing = [p for p in paths if image_id(p) not in table]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" … and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"{len(missing)} image(s) have no row in {features_csv!r} (column "
            f"{info['id_column']!r}): {shown}."
        )
    return np.stack([table[image_id(p)] for p in paths]).astype(np.float32)


def regress(
    predictor: Any,
    paths: Iterable[str],
    *,
    image_size: int,
    info: Mapping[str, Any],
    load_image: Any,
    features: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Each image's predicted targets: `{'image', 'id', 'values': {name: value}}`.

    An unreadable file gives `{'image', 'id', 'error'}` and the others are still predicted.
    Images are read `predictor.batch_size` at a time.
    """
    paths = list(paths)
    names = info["target_names"]
    rows = predictor.over_files(paths, lambda path: load_image(path, image_size), features)
    results: list[dict[str, Any]] = []
    for path, (outputs, error) in zip(paths, rows, strict=True):
        result: dict[str, Any] = {"image": path, "id": image_id(path)}
        if error is not None:
            result["error"] = error
        else:
            values = regression.to_values(np.asarray(outputs, np.float64), info)
            result["values"] = {name: float(v) for name, v in zip(names, values, strict=True)}
        results.append(result)
    return results


def format_values(results: Sequence[Mapping[str, Any]]) -> str:
    """One line per image: its path and `name=value` per target."""
    lines = []
    for result in results:
        if "values" in result:
            values = "  ".join(f"{k}={v:.4f}" for k, v in result["values"].items())
            lines.append(f"{result['image']}  {values}")
    return "\n".join(lines)


def write_submission(
    results: Sequence[Mapping[str, Any]], path: str, id_column: str, target_names: Sequence[str]
) -> int:
    """Writes `<id_column>,<target>…` rows (Kaggle's submission format); returns the row count.

    Images that could not be read have no row (their errors are reported by the caller).
    """
    rows = [r for r in results if "values" in r]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([id_column, *target_names])
        for r in rows:
            writer.writerow([r["id"], *(f"{r['values'][name]:.6g}" for name in target_names)])
    return len(rows)


def run(
    args: argparse.Namespace,
    predictor: Any,
    image_size: int,
    info: Mapping[str, Any],
    load_image: Any,
    stdout: TextIO,
) -> int:
    """`vit_jax.predict`'s command line for a regression checkpoint; returns the exit code.

    Prints each image's values (or JSON with `--json`) and writes the `--csv` submission; 1 when
    an image could not be read (the others are still predicted and written), 2 when the
    features cannot be read.
    """
    try:
        features = features_by_id(args.images, info, args.features_csv)
    except (OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = regress(
        predictor,
        args.images,
        image_size=image_size,
        info=info,
        features=features,
        load_image=load_image,
    )
    errors = [r["error"] for r in results if "error" in r]
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1), file=stdout)
    else:
        print(format_values(results), file=stdout)
    if args.csv:
        rows = write_submission(
            results, args.csv, info.get("id_column", "Id"), info["target_names"]
        )
        print(f"wrote {rows} rows to {args.csv}", file=sys.stderr)
        if errors:
            print(
                f"warning: {args.csv} lacks the {len(errors)} image(s) above that could not be "
                "read; a Kaggle submission needs a row for every test id.",
                file=sys.stderr,
            )
        if args.features_csv:
            unused = _ids_without_images(args.features_csv, info, args.images)
            if unused:
                print(
                    f"warning: {len(unused)} id(s) of {args.features_csv} were not among the "
                    f"images, so {args.csv} has no row for them: {', '.join(unused[:5])}"
                    f"{' …' if len(unused) > 5 else ''}",
                    file=sys.stderr,
                )
    return 1 if errors else 0


def _ids_without_images(
    features_csv: str, info: Mapping[str, Any], paths: Sequence[str]
) -> list[str]:
    """Ids of the features CSV (e.g. Kaggle's test.csv) that no given image has, in file order."""
    table = csv_dataset.read_features(features_csv, info["id_column"], info["feature_columns"])
    given = {image_id(p) for p in paths}
    return [i for i in table if i not in given]
