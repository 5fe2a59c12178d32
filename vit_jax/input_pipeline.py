"""Training and evaluation data: sources, preprocessing, per-host split and device batching.

This module owns:
- the four kinds of source a run can name: a tfds dataset (`'cifar10'`, with split slicing such
  as `'train[:98%]'`), an image folder (`'folder:/path'` with `train/<class>/*` and
  `test/<class>/*`), a CSV of per-image regression targets (`'csv:/path/train.csv'`, splits
  'train' and 'validation': `vit_jax.csv_dataset`), and the embedded offline set
  `'sklearn_digits'` (scikit-learn's 8×8 digits);
- preprocessing: Inception crop → resize → random flip for training, resize (or resize-small +
  centre crop) for evaluation; images in [-1, 1] float32;
- the targets a batch carries (`targets`, one of `TARGET_KINDS`): 'one_hot' or 'multi_hot'
  `label` float32 [C] for class labels, or 'value': `target` float32 [T] (a CSV's target columns,
  or the numeric value of a class name such as '1' … '5') and, for a CSV with feature columns,
  `features` float32 [F];
- the per-process slice of the data (each process reads its own disjoint part);
- batching for `pmap`: `[local_device_count, per_device, ...]`, evaluation padded with a `mask`
  so that every example is counted exactly once.

Training streams are seeded and augmentation uses stateless random ops keyed by the element's
absolute stream position, so `start_step=k` reproduces an uninterrupted stream from step k on.
- The offline set, image folders and CSVs are addressable by index: their stream is one seeded
  permutation per epoch, cut into global batches, and process i decodes only the i-th part of each
  global batch. The global batches are therefore the same for any number of processes (a 2-host
  run sees the data a 1-host run sees), and resuming costs no reading.
- tfds datasets are record files read in order: each process reads its own even split (its own
  files), shuffled with a buffer; resuming skips raw (undecoded) records. Their order depends on
  the process count.

It does not own device placement (beyond the small `prefetch_to_device` helper), the training
loop, or metrics, nor listing and decoding image files (`vit_jax.image_folder`: one decoder for
folders, tfds images and `eval_image`). Image folders are validated once per process lifetime:
every file is decoded once (lossless files TF reads twice: by TF and by Pillow, compared), which
also decides whether TF's decoder or Pillow's path reads it; in a multi-process JAX run each
process decodes its share of the files and the verdicts are all-gathered.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.util
import inspect
import logging
import math
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import csv_dataset, image_folder
from vit_jax.csv_dataset import CsvSpec

DIGITS = "sklearn_digits"
FOLDER_PREFIX = "folder:"
CSV_PREFIX = "csv:"
TARGET_KINDS = ("one_hot", "multi_hot", "value")
FOLDER_SPLITS = ("train", "test")
EVAL_CROPS = ("resize", "resize_small_crop")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_CROP_AREA = (0.05, 1.0)
_CROP_ASPECT = (3 / 4, 4 / 3)
_SKIPPED_NAMES_SHOWN = 5
# Parallel preprocessing calls of the training pipeline (fixed: see `_options`).
_TRAIN_PARALLEL_CALLS = max(1, min(os.cpu_count() or 1, 64))
_LOG = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a dataset before reading it.

    Regression (`targets='value'`): the model predicts `len(target_names)` values; `target_stats`
    ('mean', 'std', 'min', 'max', one float per target, over the train split of all processes)
    normalises the targets and scales a sigmoid output. `num_classes` stays the class count of a
    class-labelled source (0 for a CSV).
    """

    name: str
    num_classes: int
    num_examples: dict[str, int]  # per split name as given (slices resolved), all processes
    class_names: tuple[str, ...] | None
    target_names: tuple[str, ...] | None = None  # None: classification
    num_features: int = 0  # length of each example's `features` (a CSV's feature columns)
    target_stats: dict[str, tuple[float, ...]] | None = None  # None: classification


@dataclasses.dataclass(frozen=True)
class _Source:
    """One split, already restricted to this process: raw elements and how to decode them."""

    # Elements {'image': raw, 'label': int64 or int64[None]}, or (a CSV) {'image': raw,
    # 'target': float32 [T], 'features': float32 [F] if F > 0}.
    dataset: tf.data.Dataset
    decode: Callable[[Any], tf.Tensor]  # raw image (tensor or ImageFiles of one file) → uint8
    num_examples: int  # examples of this process
    max_process_examples: int  # the most any process holds (eval pads every process to it)
    num_classes: int  # 0 for a CSV
    class_names: tuple[str, ...] | None
    total_examples: int  # of the whole split, all processes
    # The whole split (all processes) as (raw images or `ImageFiles`, the elements' other fields),
    # when it is held in memory and so addressable by index: training then reads it in one global
    # order.
    arrays: tuple[np.ndarray | image_folder.ImageFiles, dict[str, np.ndarray]] | None = None
    target_names: tuple[str, ...] | None = None  # a CSV's target columns (regression only)
    num_features: int = 0


class EvalBatches:
    """Re-iterable evaluation batches: each `iter()` is one full pass, last batches padded.

    Every process yields the same number of batches (`len(self)`), so a pmap'd eval never waits
    on a process that ran out; padded entries have `mask == 0`.
    """

    def __init__(self, dataset: tf.data.Dataset, num_batches: int, num_examples: int):
        self._dataset = dataset
        self.num_batches = num_batches
        self.num_examples = num_examples  # real examples of this process

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._dataset.as_numpy_iterator())

    def __len__(self) -> int:
        return self.num_batches


# ----------------------------------------------------------------------------------------------
# Public interface.


def get_dataset_info(
    dataset: str,
    *,
    train_split: str,
    test_split: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    targets: str = "one_hot",
    csv: CsvSpec | None = None,
) -> DatasetInfo:
    """Number of classes, class names and the example count of both splits (all processes).

    In a multi-process JAX run, pass this process's `process_index`/`process_count` and call it
    on every process at once: an image folder's (or a CSV's) validation is then split between them.
    `targets` is what the batches will carry (as for the iterators); with 'value', `target_names`
    and `target_stats` (over `train_split`) are filled in. A tfds dataset's stats cost one pass
    over the train split's labels (images not decoded). `csv` (None: `CsvSpec()`) reads a
    `'csv:…'` dataset.
    """
    load = functools.partial(
        _load_source,
        dataset,
        process_index=process_index,
        process_count=process_count,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        csv=csv,
    )
    sources = {split: load(split) for split in (train_split, test_split)}
    source = sources[train_split]
    _check_targets(dataset, source, targets)
    stats, names = None, source.target_names
    if targets == "value":
        names = names or ("label",)  # a class-labelled source: the class name's value
        if source.arrays is None:  # tfds: every process reads all labels of the split
            source = load(train_split, process_index=0, process_count=1)
        stats = csv_dataset.target_stats(_train_values(dataset, source))
    return DatasetInfo(
        name=dataset,
        num_classes=source.num_classes,
        num_examples={split: s.total_examples for split, s in sources.items()},
        class_names=source.class_names,
        target_names=names,
        num_features=source.num_features,
        target_stats=stats,
    )


def get_train_iterator(
    dataset: str,
    split: str,
    *,
    image_size: int,
    global_batch_size: int,
    local_device_count: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    shuffle_buffer: int = 10_000,
    targets: str = "one_hot",
    download: bool = True,
    csv: CsvSpec | None = None,
) -> Iterator[Batch]:
    """Endless augmented training batches `{'image', 'label'}` shaped for `pmap`.

    With `targets='value'`: `{'image', 'target'}`, plus `'features'` for a CSV with feature
    columns. `start_step=k` yields exactly the batches an uninterrupted iterator yields from step
    k on. `shuffle_buffer` applies to tfds datasets only (the others are permuted whole, per
    epoch).
    """
    per_host, per_device = _batch_sizes(global_batch_size, local_device_count, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    source = _load_source(
        dataset,
        split,
        process_index=process_index,
        process_count=process_count,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        shuffle_seed=seed,
        csv=csv,
    )
    encode = _target_encoder(dataset, source, targets)
    base_seed = tf.constant([seed, 0], tf.int64)
    if source.arrays is not None:
        ds = _global_order(
            *source.arrays,
            seed=seed,
            start_step=start_step,
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
        )
    else:  # positions count this process's own stream
        base_seed = tf.random.experimental.stateless_fold_in(base_seed, process_index)
        ds = source.dataset.repeat().shuffle(shuffle_buffer, seed=seed)
        ds = ds.enumerate().skip(start_step * per_host)

    def preprocess(position, example):
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(base_seed, position), 2
            )
        )
        image = _inception_crop(source.decode(example["image"]), crop_seed)
        image = _resize(image, image_size)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return {"image": _normalize(image), **encode(example)}

    ds = ds.map(preprocess, num_parallel_calls=_TRAIN_PARALLEL_CALLS)
    ds = ds.batch(per_host, drop_remainder=True)
    ds = ds.map(functools.partial(_shard, devices=local_device_count, per_device=per_device))
    ds = ds.prefetch(2).with_options(_options(autotune=False))
    return iter(ds.as_numpy_iterator())


def get_eval_iterator(
    dataset: str,
    split: str,
    *,
    image_size: int,
    global_batch_size: int,
    local_device_count: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    eval_crop: Literal["resize", "resize_small_crop"] = "resize",
    targets: str = "one_hot",
    download: bool = True,
    csv: CsvSpec | None = None,
) -> EvalBatches:
    """Evaluation batches `{'image', 'label', 'mask'}`; each pass covers every example once.

    With `targets='value'`: `'target'` (and a CSV's `'features'`) instead of `'label'`; padded
    entries are zeros with `mask == 0`.
    """
    if eval_crop not in EVAL_CROPS:
        raise ValueError(f"Unknown eval_crop {eval_crop!r}; valid values: {', '.join(EVAL_CROPS)}.")
    per_host, per_device = _batch_sizes(global_batch_size, local_device_count, process_count)
    source = _load_source(
        dataset,
        split,
        process_index=process_index,
        process_count=process_count,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        csv=csv,
    )
    encode = _target_encoder(dataset, source, targets)
    num_batches = math.ceil(source.max_process_examples / per_host)

    def preprocess(example):
        image = source.decode(example["image"])
        if eval_crop == "resize":
            image = _resize(image, image_size)
        else:
            image = _resize_small_centre_crop(image, image_size)
        return {
            "image": _normalize(image),
            **encode(example),
            "mask": tf.constant(1.0, tf.float32),
        }

    ds = source.dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    padding = tf.data.Dataset.from_tensors(zeros)  # every key, mask 0
    padding = padding.repeat(num_batches * per_host - source.num_examples)
    ds = ds.concatenate(padding).batch(per_host, drop_remainder=True)
    ds = ds.map(functools.partial(_shard, devices=local_device_count, per_device=per_device))
    ds = ds.prefetch(2).with_options(_options())
    return EvalBatches(ds, num_batches=num_batches, num_examples=source.num_examples)


def needs_preparation(dataset: str) -> bool:
    """Whether `dataset` is a tfds dataset (downloaded and prepared on first use)."""
    return not (
        dataset == DIGITS or dataset.startswith(FOLDER_PREFIX) or dataset.startswith(CSV_PREFIX)
    )


def prefetch_to_device(iterator: Iterable[Batch], size: int = 2) -> Iterator[Any]:
    """Puts `size` batches ahead on the local devices (leading axis = device), for `pmap`."""
    from flax import jax_utils  # only this helper needs flax/jax

    return jax_utils.prefetch_to_device(iter(iterator), size)


# ----------------------------------------------------------------------------------------------
# Batch arithmetic and tf.data helpers.


def _batch_sizes(global_batch_size: int, local_device_count: int, process_count: int):
    """(per-process batch, per-device batch), or a ValueError with the numbers."""
    devices = process_count * local_device_count
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count × local_device_count = {process_count} × {local_device_count} = "
            f"{devices}."
        )
    return global_batch_size // process_count, global_batch_size // devices


def _shard(batch: dict, *, devices: int, per_device: int) -> dict:
    """[per_host, ...] → [devices, per_device, ...]."""
    return {k: tf.reshape(v, [devices, per_device, *v.shape[1:]]) for k, v in batch.items()}


def _options(autotune: bool = True) -> tf.data.Options:
    """Deterministic order; `autotune=False` for long-lived training iterators.

    tf.data's autotuning thread can hold an iterator's destructor for up to its re-tuning
    interval, which grows towards a minute over a long run: the end of a long training phase
    stalled for 11-50 s in about a third of runs. Training therefore uses a fixed parallelism.
    """
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = autotune
    return options


def _global_order(
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

    return ds.map(element, num_parallel_calls=_TRAIN_PARALLEL_CALLS)


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )


def _process_slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """(own count, max count) for a strided split of n examples over processes."""
    _check_process(process_index, process_count)
    return len(range(process_index, n, process_count)), math.ceil(n / process_count)


# ----------------------------------------------------------------------------------------------
# Preprocessing (graph-mode, stateless).


def _inception_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random crop of 5–100 % area and aspect 3/4–4/3; falls back to the whole image."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=_CROP_ASPECT,
        area_range=_CROP_AREA,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.slice(image, begin, size)


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear resize (up or down) to a square; float32 in [0, 255]."""
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _resize_small_centre_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize the shorter side to image_size·256/224, then take the centre square.

    Shrinking uses area averaging (antialiased: each output pixel is the mean of the input area
    it covers), as big_vision's `resize_small` does; enlarging uses bilinear interpolation (area
    would repeat input pixels in blocks). Either way float32 in [0, 255].
    """
    small = round(image_size * 256 / 224)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = small / tf.reduce_min(hw)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), small)
    image = tf.cond(
        scale < 1.0,
        lambda: tf.image.resize(image, new_hw, method="area"),
        lambda: tf.image.resize(image, new_hw, method="bilinear"),
    )
    top, left = (new_hw[0] - image_size) // 2, (new_hw[1] - image_size) // 2
    image = tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _normalize(image: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(tf.cast(image, tf.float32) / 127.5 - 1.0, -1.0, 1.0)


def _encode_label(label: tf.Tensor, num_classes: int, multi_hot: bool) -> tf.Tensor:
    """One-hot float32; with multi_hot, a list of labels becomes one multi-hot vector."""
    if multi_hot and label.shape.rank == 1:
        return tf.reduce_max(tf.one_hot(label, num_classes, dtype=tf.float32), axis=0)
    if label.shape.rank != 0:
        raise ValueError(f"Labels of shape {label.shape} need targets='multi_hot'.")
    return tf.one_hot(label, num_classes, dtype=tf.float32)


def _check_targets(dataset: str, source: _Source, targets: str) -> None:
    """One clear error for a `targets` kind the source cannot give."""
    if targets not in TARGET_KINDS:
        raise ValueError(f"Unknown targets {targets!r}; valid values: {', '.join(TARGET_KINDS)}.")
    if source.target_names is not None and targets != "value":
        raise ValueError(
            f"Dataset {dataset!r} has regression targets ({', '.join(source.target_names)}), "
            f"not class labels: use targets='value' (task='regression'), not {targets!r}."
        )
    if targets == "value" and source.target_names is None:
        if source.dataset.element_spec["label"].shape.rank != 0:
            raise ValueError(
                f"Dataset {dataset!r} has several labels per example: targets='value' needs one "
                "class per example (use targets='multi_hot')."
            )
        csv_dataset.class_values(dataset, source.class_names)


def _target_encoder(dataset: str, source: _Source, targets: str) -> Callable[[dict], dict]:
    """A raw element's label or target fields → the batch's target keys for `targets`."""
    _check_targets(dataset, source, targets)
    if source.target_names is not None:  # a CSV: its fields as they are
        return lambda ex: {k: ex[k] for k in ("target", "features") if k in ex}
    if targets == "value":
        values = tf.constant(csv_dataset.class_values(dataset, source.class_names))
        return lambda ex: {"target": tf.gather(values, ex["label"])[None]}
    multi_hot = targets == "multi_hot"
    return lambda ex: {"label": _encode_label(ex["label"], source.num_classes, multi_hot)}


def _train_values(dataset: str, source: _Source) -> np.ndarray:
    """float [N, T]: the regression targets of a whole split (a tfds one read in one pass)."""
    if source.arrays is not None:
        fields = source.arrays[1]
        if "target" in fields:
            return fields["target"]
        labels = fields["label"]
    else:
        labels = np.fromiter(source.dataset.map(lambda ex: ex["label"]).as_numpy_iterator(), int)
    return csv_dataset.class_values(dataset, source.class_names)[labels][:, None]


# ----------------------------------------------------------------------------------------------
# Sources.


def _load_source(
    dataset: str,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
    shuffle_seed: int | None = None,
    csv: CsvSpec | None = None,
) -> _Source:
    if dataset == DIGITS:
        return _digits_source(split, process_index, process_count)
    if dataset.startswith(FOLDER_PREFIX):
        root = dataset[len(FOLDER_PREFIX) :]
        return _folder_source(root, split, process_index, process_count)
    if dataset.startswith(CSV_PREFIX):
        path = dataset[len(CSV_PREFIX) :]
        return _csv_source(path, split, csv or CsvSpec(), process_index, process_count)
    return _tfds_source(
        dataset,
        split,
        process_index,
        process_count,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        shuffle_seed=shuffle_seed,
    )


def _from_arrays(
    images: Any,
    fields: dict[str, np.ndarray],
    decode: Callable,
    process_index: int,
    process_count: int,
    class_names: tuple[str, ...] | None,
    target_names: tuple[str, ...] | None = None,
) -> _Source:
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
    return _Source(
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
    )


def _digits_source(split: str, process_index: int, process_count: int) -> _Source:
    images, labels = _digits_split(split)
    class_names = tuple(str(i) for i in range(10))
    fields = {"label": labels}
    return _from_arrays(images, fields, tf.identity, process_index, process_count, class_names)


@functools.cache
def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (0–16) as uint8 RGB 0–255, split 80/20 stratified, seeded."""
    if split not in FOLDER_SPLITS:
        raise ValueError(f"{DIGITS} has splits {FOLDER_SPLITS}, got {split!r}.")
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


def _folder_source(root: str, split: str, process_index: int, process_count: int) -> _Source:
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
    entries = image_folder.scan_dir(train_dir)
    names = sorted(e.name for e in entries if e.is_dir() and e.name[0] != ".")
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
    unknown = sorted(
        e.name
        for e in image_folder.scan_dir(split_dir)
        if e.is_dir() and e.name[0] != "." and e.name not in class_names
    )
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


def _csv_source(
    path: str, split: str, spec: CsvSpec, process_index: int, process_count: int
) -> _Source:
    """A CSV's split (`vit_jax.csv_dataset`): image files with 'target' (and 'features')."""
    _check_process(process_index, process_count)
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


def _tfds_source(
    name: str,
    split: str,
    process_index: int,
    process_count: int,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    download: bool,
    shuffle_seed: int | None,
) -> _Source:
    """This process's even part of a tfds split, images left encoded until after skipping."""
    _check_process(process_index, process_count)
    own_split = split
    if process_count > 1:
        own_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds, info = _tfds_load(
        name,
        own_split,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        shuffle_seed=shuffle_seed,
    )
    own = _count(ds)
    try:
        total = info.splits[split].num_examples
    except (KeyError, ValueError):  # tfds mock_data has no split info
        total = own * process_count
    label = info.features["label"]
    label = getattr(label, "feature", label)  # Sequence(ClassLabel) for multi-label sets
    names = tuple(label.names) if getattr(label, "names", None) else None
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    return _Source(
        ds,
        image_folder.decode_encoded,
        own,
        max(own, math.ceil(total / process_count)),
        label.num_classes,
        names,
        total,
    )


class DatasetUnavailableError(FileNotFoundError):
    """A tfds dataset that is neither prepared in its data_dir nor preparable here and now."""


# How long `_tfds_load` waits for the download hosts of an unprepared dataset to answer before
# giving up (tfds's own downloader retries an unreachable host for minutes, silently).
_PROBE_TIMEOUT_S = 10.0
_PROBED_HOSTS_MAX = 8
_DEFAULT_PORTS = {"https": 443, "http": 80, "ftp": 21}
_TFDS_DEFAULT_DIR = "~/tensorflow_datasets"
_TFDS_UNDECLARED = ("importlib_resources",)  # see `_tfds_undeclared_modules`
# tfds's own code when `download_and_prepare` is the real one (`tfds.testing.mock_data` replaces
# it with one that downloads nothing, so nothing needs the network then).
_REAL_DOWNLOAD_AND_PREPARE = vars(tfds.core.DatasetBuilder)["download_and_prepare"]


def _tfds_load(
    name: str,
    split: Any,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    download: bool,
    shuffle_seed: int | None,
) -> tuple[tf.data.Dataset, Any]:
    """tfds.load, with a failure to find or prepare the data turned into one clear error.

    Before tfds downloads an unprepared dataset, its download hosts (from the dataset's
    registered checksums) must answer within `_PROBE_TIMEOUT_S`: without network, the run
    stops in seconds with `DatasetUnavailableError` saying how to prepare the data elsewhere,
    instead of tfds's retries going on for minutes without a word.
    """
    try:
        if download:
            _check_can_prepare(name, data_dir=data_dir, manual_dir=manual_dir)
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            with_info=True,
            shuffle_files=shuffle_seed is not None,
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
            decoders={"image": tfds.decode.SkipDecoding()},
            download_and_prepare_kwargs={
                "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
            },
        )
    except DatasetUnavailableError:
        raise
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown dataset {name!r}: {e}") from e
    except ImportError as e:  # tfds imports some of its dependencies only when preparing
        raise _missing_module_error(name, e.name or str(e)) from e
    except Exception as e:
        raise DatasetUnavailableError(
            f"Could not load tfds dataset {name!r} (split {split!r}) from data_dir="
            f"{_tfds_where(data_dir)}: {type(e).__name__}: {e}\n"
            + _tfds_prepare_hint(name, data_dir, manual_dir)
        ) from e


def _check_can_prepare(name: str, *, data_dir: str | None, manual_dir: str | None) -> None:
    """Nothing when `name` is prepared in data_dir or can be prepared now; else a clear error.

    Checks, in this order, what a download needs: its hosts answer (`DatasetUnavailableError`
    naming them), and tfds's undeclared dependencies are installed (`ModuleNotFoundError`).
    """
    builder = tfds.builder(name, data_dir=data_dir)
    prepare = vars(tfds.core.DatasetBuilder)["download_and_prepare"]
    if prepare is not _REAL_DOWNLOAD_AND_PREPARE or builder.is_prepared():
        return
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS is None:  # manual datasets read manual_dir instead
        unreachable = _unreachable(_download_endpoints(builder), _PROBE_TIMEOUT_S)
        if unreachable:
            reasons = "; ".join(f"{host}:{port} ({why})" for (host, port), why in unreachable)
            raise DatasetUnavailableError(
                f"tfds dataset {name!r} is not prepared in data_dir={_tfds_where(data_dir)}, and "
                f"it cannot be downloaded here: no network connection to its download host(s) "
                f"within {_PROBE_TIMEOUT_S:g} s: {reasons}.\n"
                + _tfds_prepare_hint(name, data_dir, manual_dir)
            )
    missing = _tfds_missing_modules()
    if missing:
        raise _missing_module_error(name, missing[0])


def _download_endpoints(builder: Any) -> list[tuple[str, int]]:
    """(host, port) to reach for the URLs of the builder's registered checksums, proxies applied.

    Read from the checksums file next to the builder's code (or tfds's legacy `url_checksums/`
    file) without tfds's `url_infos`, which needs `importlib_resources`. Empty when the dataset
    registers no URLs.
    """
    candidates = [
        os.path.join(os.path.dirname(tfds.__file__), "url_checksums", f"{builder.name}.txt")
    ]
    try:
        code_dir = os.path.dirname(inspect.getfile(type(builder)))
        candidates.insert(0, os.path.join(code_dir, "checksums.tsv"))
    except (TypeError, OSError):  # a builder class defined outside a file
        pass
    urls = []
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            urls = [line.split()[0] for line in lines if line and not line.startswith("#")]
            break
    proxies = urllib.request.getproxies()
    endpoints: list[tuple[str, int]] = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            parts = urllib.parse.urlsplit(proxy if "//" in proxy else f"http://{proxy}")
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
        if parts.hostname and (parts.hostname, port) not in endpoints:
            endpoints.append((parts.hostname, port))
    return endpoints[:_PROBED_HOSTS_MAX]


def _unreachable(
    endpoints: list[tuple[str, int]], timeout: float
) -> list[tuple[tuple[str, int], str]]:
    """The endpoints that do not accept a TCP connection within `timeout` s, with the reason.

    Probed in parallel daemon threads and waited for at most `timeout` s in all, name lookup
    included (a resolver without network can block longer than a socket timeout covers).
    """
    results: dict[tuple[str, int], str | None] = {}

    def probe(endpoint: tuple[str, int]) -> None:
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
        except Exception as e:  # any failure means "not reachable"
            results[endpoint] = f"{type(e).__name__}: {e}"
        else:
            results[endpoint] = None

    threads = [threading.Thread(target=probe, args=(e,), daemon=True) for e in endpoints]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answers = dict(results)  # threads still running may write later
    unreachable = []
    for endpoint in endpoints:
        if endpoint not in answers:
            unreachable.append((endpoint, f"no answer within {timeout:g} s"))
        elif answers[endpoint] is not None:
            unreachable.append((endpoint, answers[endpoint]))
    return unreachable


def _tfds_undeclared_modules() -> list[str]:
    """Modules the installed tfds imports when preparing a dataset without declaring them.

    tensorflow-datasets 4.9.10 imports `importlib_resources` (lazily, in its dataset builder)
    on every Python version, but requires it only for Python < 3.9.
    """
    from tensorflow_datasets.core import dataset_builder

    return [m for m in _TFDS_UNDECLARED if m in vars(dataset_builder)]


def _tfds_missing_modules() -> list[str]:
    """`_tfds_undeclared_modules` that are not installed here."""
    return [m for m in _tfds_undeclared_modules() if importlib.util.find_spec(m) is None]


def _missing_module_error(name: str, module: str) -> ModuleNotFoundError:
    """The error for a module that preparing `name` needs, with the `pip install` that fixes it."""
    why = (
        f", which tensorflow-datasets {tfds.__version__} imports without declaring it"
        if module in _TFDS_UNDECLARED
        else ", which is not installed"
    )
    return ModuleNotFoundError(
        f"Preparing tfds dataset {name!r} needs the Python module {module!r}{why}. Install it "
        f"(`pip install {module}`) and run again.",
        name=module,
    )


def _tfds_where(data_dir: str | None) -> str:
    return data_dir or f"the tfds default ({_TFDS_DEFAULT_DIR} or $TFDS_DATA_DIR)"


def _tfds_prepare_hint(name: str, data_dir: str | None, manual_dir: str | None) -> str:
    """How to prepare `name` offline: build it where there is network, copy the data_dir."""
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    manual = f" --manual_dir={manual_dir}" if manual_dir else ""
    target = data_dir or _TFDS_DEFAULT_DIR
    undeclared = _tfds_undeclared_modules()
    first = f" (after `pip install {' '.join(undeclared)}`)" if undeclared else ""
    return (
        f"Prepare it on a machine with network access: `tfds build {name}{dir_flag}{manual}`"
        f"{first}, then copy that data_dir ({target}) here and point the run at it with "
        "--config.data_dir=<the copied directory>."
    )


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


# ----------------------------------------------------------------------------------------------
# Single images (prediction).


def eval_image(path: str, image_size: int, eval_crop: str = "resize") -> np.ndarray:
    """One image file with `get_eval_iterator`'s preprocessing: float32 [S, S, 3] in [-1, 1].

    Decoded as image-folder files are (`image_folder.read_image`: TF's default decoder, or
    Pillow's path for what TF does not read; grayscale, RGBA, CMYK, 16-bit → RGB), then the
    same `eval_crop` resize and normalisation, so a prediction sees what evaluation saw. A
    missing or undecodable file raises what Pillow raises (an OSError, mostly).
    """
    if eval_crop not in EVAL_CROPS:
        raise ValueError(f"Unknown eval_crop {eval_crop!r}; valid values: {', '.join(EVAL_CROPS)}.")
    image = tf.constant(image_folder.read_image(path))
    crop = _resize if eval_crop == "resize" else _resize_small_centre_crop
    return _normalize(crop(image, image_size)).numpy()
