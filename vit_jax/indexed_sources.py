"""The sources addressable by index: the embedded digits, image folders and CSVs, as a `Source`.

This module owns
- `'sklearn_digits'`: scikit-learn's 8×8 digits as uint8 RGB, split 80/20 stratified, seeded;
- image folders (`train/<class>/*`, `test/<class>/*`): their classes, and which files are
  readable images and which decoder reads each (TF's or Pillow's path);
- CSVs of per-image targets (`vit_jax.csv_dataset` reads them; here they become a `Source`);
- the strided per-process slice of such an in-memory split for evaluation, and the training
  stream over the whole split in one global order (`global_order`, the sources'
  `global_stream`): the same global batches for any process count.

Image folders and CSVs are validated once per process lifetime: every file is decoded once
(lossless files TF reads twice: by TF and by Pillow, compared); in a multi-process JAX run each
process decodes its share of the files and the verdicts are all-gathered. Skipped files are
logged under the logger name `vit_jax.input_pipeline`, as they were before this module was split
out of it.

It does not own preprocessing or batching (`vit_jax.input_pipeline`), tfds datasets
(`vit_jax.tfds_source`), nor listing and decoding image files (`vit_jax.image_folder`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from vit_jax import csv_dataset, image_folder
from vit_jax.csv_dataset import CsvSpec
from vit_jax.source import TRAIN_PARALLEL_CALLS, Source, check_process

DIGITS = "sklearn_digits"
FOLDER_SPLITS = ("train", "test")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_SKIPPED_NAMES_SHOWN = 5
_LOG = logging.getLogger("vit_jax.input_pipeline")  # the name users filter on (see above)


def _process_slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """(own count, max count) for a strided split of n examples over processes."""
    check_process(process_index, process_count)
    return len(range(process_index, n, process_count)), math.ceil(n / process_count)


def _from_arrays(
    images: Any,
    fields: dict[str, np.ndarray],
    decode: Callable,
    process_index: int,
    process_count: int,
    class_names: tuple[str, ...] | None,
    target_names: tuple[str, ...] | None = None,
) -> Source:
    """Strided per-process slice of in-memory images (or `ImageFiles`) and their fields.

    `fields`: {'label': int64 [N]}, or a CSV's {'target': float32 [N, T], 'features' [N, F]}.
    """
    n = len(next(iter(fields.values())))
    own, most = _process_slice(n, process_index, process_count)
    own_part = slice(process_index, None, process_count)
    own_images = tf.nest.map_structure(lambda array: array[own_part], images)
    own_fields = {key: values[own_part] for key, values in fields.items()}
    ds = tf.data.Dataset.from_tensor_slices({"image": own_images, **own_fields})
    num_features = fields["features"].shape[1] if "features" in fields else 0
    return Source(
        ds,
        decode,
        own,
        most,
        len(class_names or ()),
        class_names,
        n,
        (images, fields),
        target_names,
        num_features,
        functools.partial(global_order, images, fields),
    )


def global_order(
    images: np.ndarray | image_folder.ImageFiles,
    fields: dict[str, np.ndarray],
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """`(position, {'image', **fields})` of this process's part of each global batch, raw images.

    Stream position p holds example `permutation_e[p mod n]` of epoch e = p // n (a seeded
    permutation of all n examples per epoch); global batch b is positions [bB, (b+1)B) and process
    i takes its i-th contiguous part. Only integers are skipped and sliced; each process gathers
    (and later decodes) its own examples only.
    """
    n = len(next(iter(fields.values())))  # 'label', or a CSV's 'target' (and 'features')
    per_host = global_batch_size // process_count
    first = start_step * global_batch_size
    epoch_seed = tf.constant([seed, 1], tf.int64)

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), tf.random.experimental.stateless_fold_in(epoch_seed, e)
        )
        return tf.data.Dataset.from_tensor_slices((e * n + tf.range(n, dtype=tf.int64), order))

    own = slice(process_index * per_host, (process_index + 1) * per_host)
    ds = tf.data.Dataset.range(first // n, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.skip(first % n).batch(global_batch_size).map(lambda p, i: (p[own], i[own])).unbatch()
    columns = {key: tf.constant(values) for key, values in fields.items()}
    if isinstance(images, image_folder.ImageFiles):  # paths looked up in Python, not embedded
        paths = images.paths.astype(np.bytes_)  # in the graph (millions would near protobuf's 2 GB)
        tf_decodes = tf.constant(images.tf_decodes, tf.bool)  # next to each path, by index

        def image_at(i):
            path = tf.numpy_function(lambda j: paths[j], [i], tf.string, stateful=False)
            path.set_shape([])
            return image_folder.ImageFiles(path, tf.gather(tf_decodes, i))
    else:
        images = tf.constant(images)

        def image_at(i):
            return tf.gather(images, i)

    def element(p, i):
        return p, {"image": image_at(i), **{k: tf.gather(v, i) for k, v in columns.items()}}

    return ds.map(element, num_parallel_calls=TRAIN_PARALLEL_CALLS)


def digits_source(split: str, process_index: int, process_count: int) -> Source:
    images, labels = _digits_split(split)
    class_names = tuple(str(i) for i in range(10))
    fields = {"label": labels}
    return _from_arrays(images, fields, tf.identity, process_index, process_count, class_names)


@functools.cache
def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (0–16) as uint8 RGB 0–255, split 80/20 stratified, seeded.

    A leading part of a split, as tfds writes it: 'train[:10%]' or 'train[:150]' (the split
    is a stratified shuffle, so a leading part has about every class's share).
    """
    sliced = re.fullmatch(r"(\w+)\[:(\d+)(%?)\]", split)
    if sliced:
        images, labels = _digits_split(sliced[1])
        count = int(sliced[2])
        count = round(len(labels) * count / 100) if sliced[3] else count
        if not 0 < count <= len(labels):
            raise ValueError(
                f"{DIGITS} split {split!r} asks for {count} of {len(labels)} examples."
            )
        return images[:count], labels[:count]
    if split not in FOLDER_SPLITS:
        raise ValueError(
            f"{DIGITS} has splits {FOLDER_SPLITS} (or a leading part: 'train[:10%]', "
            f"'train[:150]'), got {split!r}."
        )
    from sklearn.datasets import load_digits  # only this source needs scikit-learn
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        labels,
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    return (train_x, train_y) if split == "train" else (test_x, test_y)


def folder_source(root: str, split: str, process_index: int, process_count: int) -> Source:
    if split not in FOLDER_SPLITS:
        raise ValueError(f"Image folder {root!r} has splits {FOLDER_SPLITS}, got {split!r}.")
    class_names = _folder_classes(root)
    paths, labels, tf_decodes = _scan_folder_split(
        os.path.abspath(root), split, class_names, process_index, process_count
    )
    return _from_arrays(
        image_folder.ImageFiles(np.array(paths), np.array(tf_decodes, bool)),
        {"label": np.array(labels, np.int64)},
        _decode_folder_file,
        process_index,
        process_count,
        class_names,
    )


def _folder_classes(root: str) -> tuple[str, ...]:
    """Sorted class folder names of `<root>/train`; errors name the path that is wrong."""
    for split in FOLDER_SPLITS:
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(
                f"Image folder {root!r} has no '{split}/' directory at "
                f"{os.path.join(root, split)!r}; expected {root}/train/<class>/* and "
                f"{root}/test/<class>/*."
            )
    train_dir = os.path.join(root, "train")
    names = image_folder.class_dirs(train_dir)
    if not names:
        raise ValueError(f"Image folder {train_dir!r} has no class sub-directories.")
    return tuple(names)


@functools.cache
def _scan_folder_split(
    root: str,
    split: str,
    class_names: tuple[str, ...],
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[bool, ...]]:
    """Readable image files, their labels and whether TF's decoder reads each (else Pillow).

    Bad files are skipped and reported once. The same on every process (training reads the
    split in one global order).
    """
    split_dir = os.path.join(root, split)
    unknown = image_folder.unknown_classes(split_dir, class_names)
    if unknown:
        raise ValueError(f"{split_dir!r} has classes not in train/: {unknown}.")
    candidates = []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        files = image_folder.list_files(class_dir)
        if not files:
            raise ValueError(f"Class folder {class_dir!r} is missing or has no files.")
        candidates += [(path, label) for path in files]
    verdicts = _readable([p for p, _ in candidates], process_index, process_count)
    kept = [(*c, v) for c, v in zip(candidates, verdicts, strict=True) if v != _UNREADABLE]
    skipped = [p for (p, _), v in zip(candidates, verdicts, strict=True) if v == _UNREADABLE]
    if skipped:
        _LOG.warning(
            "Image folder %s: skipped %d unreadable or non-image file(s), e.g. %s",
            split_dir,
            len(skipped),
            ", ".join(skipped[:_SKIPPED_NAMES_SHOWN]),
        )
    if not kept:
        raise ValueError(f"Image folder {split_dir!r} has no readable images.")
    present = {lab for _, lab, _ in kept}  # one pass: a folder may hold millions of files
    for label, name in enumerate(class_names):
        if label not in present:
            class_dir = os.path.join(split_dir, name)
            raise ValueError(f"Class folder {class_dir!r} has no readable images.")
    paths, labels, verdicts = zip(*kept, strict=True)
    return paths, labels, tuple(v == _TF_DECODES for v in verdicts)


def _readable(paths: list[str], process_index: int, process_count: int) -> list[int]:
    """Each file's verdict (`_is_readable_image`), decided by decoding it.

    In a multi-process JAX run (`jax.process_count() == process_count > 1`), process i decodes
    files i, i + n, … only and the verdicts are all-gathered, so a folder of millions of images
    costs each host its share. Otherwise (one process, or processes simulated in one) all of them.
    """
    if process_count == 1 or not _in_multiprocess_run(process_count):
        return _decode_check(paths)
    from jax.experimental import multihost_utils  # only this path needs jax

    own = _decode_check(paths[process_index::process_count])
    width = math.ceil(len(paths) / process_count)
    padded = np.zeros([width], np.uint8)
    padded[: len(own)] = own
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [process_count, width]
    verdicts = [_UNREADABLE] * len(paths)
    for index in range(process_count):
        share = len(range(index, len(paths), process_count))
        verdicts[index::process_count] = [int(v) for v in gathered[index, :share]]
    return verdicts


def _in_multiprocess_run(process_count: int) -> bool:
    import jax

    return jax.process_count() == process_count


def _decode_check(paths: list[str]) -> list[int]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_is_readable_image, paths))


# A file's verdict: not an image (skipped), read by TF's decoder, read by Pillow's path.
_UNREADABLE, _TF_DECODES, _PILLOW_DECODES = 0, 1, 2


def _is_readable_image(path: str) -> int:
    """The file's verdict: `_UNREADABLE` (0, falsy) or which decoder reads it."""
    try:
        return _TF_DECODES if image_folder.tf_decodes(path) else _PILLOW_DECODES
    except Exception:  # any decode failure means "skip this file"
        return _UNREADABLE


def _decode_folder_file(file: image_folder.ImageFiles) -> tf.Tensor:
    return image_folder.decode_file(file.paths, file.tf_decodes)


def csv_source(
    path: str, split: str, spec: CsvSpec, process_index: int, process_count: int
) -> Source:
    """A CSV's split (`vit_jax.csv_dataset`): image files with 'target' (and 'features')."""
    check_process(process_index, process_count)
    data = _csv_data(os.path.abspath(path), spec, process_index, process_count)
    part = data.split(split)
    fields = {"target": part.targets}
    if part.features.shape[1]:
        fields["features"] = part.features
    images = image_folder.ImageFiles(part.paths, part.tf_decodes)
    return _from_arrays(
        images, fields, _decode_folder_file, process_index, process_count, None, spec.target_columns
    )


@functools.cache
def _csv_data(
    path: str, spec: CsvSpec, process_index: int, process_count: int
) -> csv_dataset.CsvData:
    """A CSV read and its images judged once per process lifetime, as image folders are."""

    def decoders(paths: list[str]) -> list[bool | None]:
        verdicts = _readable(paths, process_index, process_count)
        return [None if v == _UNREADABLE else v == _TF_DECODES for v in verdicts]

    return csv_dataset.load(path, spec, decoders)
