"""Training and evaluation data: which source, preprocessing, per-host split and device batching.

This module owns:
- the names of the five kinds of source a run can name, and which module reads each: a tfds
  dataset (`'cifar10'`, with split slicing such as `'train[:98%]'`: `vit_jax.tfds_source`),
  addressable by index in memory (`vit_jax.indexed_sources`) an image folder (`'folder:/path'`
  with `train/<class>/*` and `test/<class>/*`), a CSV of per-image regression targets
  (`'csv:/path/train.csv'`, splits 'train' and 'validation': `vit_jax.csv_dataset`) and the
  embedded offline set `'sklearn_digits'` (scikit-learn's 8×8 digits), and addressable by index
  on disk, an image folder prepared once into ArrayRecord shards (`'records:/path'`, written by
  `python -m vit_jax.prepare_data`: `vit_jax.records_source`);
- preprocessing: Inception crop → resize → random flip for training, resize (or resize-small +
  centre crop) for evaluation; images in [-1, 1] float32;
- the targets a batch carries (`targets`, one of `TARGET_KINDS`): 'one_hot' or 'multi_hot'
  `label` float32 [C] for class labels, or 'value': `target` float32 [T] (a CSV's target columns,
  or the numeric value of a class name such as '1' … '5') and, for a CSV with feature columns,
  `features` float32 [F];
- the training order over the processes (each process reads its own disjoint part);
- batching for `pmap`: `[local_device_count, per_device, ...]`, evaluation padded with a `mask`
  so that every example is counted exactly once.

Training streams are seeded and augmentation uses stateless random ops keyed by the element's
absolute stream position, so `start_step=k` reproduces an uninterrupted stream from step k on.
- The offline set, image folders and CSVs are addressable by index: their stream
  (`indexed_sources.global_order`, handed over as `Source.global_stream`) is one seeded
  permutation per epoch, cut into global batches, and process i decodes only the i-th part of each
  global batch. The global batches are therefore the same for any number of processes (a 2-host
  run sees the data a 1-host run sees), and resuming costs no reading. Prepared records follow
  the same rule with grain's per-epoch shuffle (`vit_jax.records_source`).
- tfds datasets are record files read in order: each process reads its own even split (its own
  files), shuffled with a buffer; resuming skips raw (undecoded) records. Their order depends on
  the process count.

It does not own reading the sources (`vit_jax.tfds_source`, `vit_jax.indexed_sources`, both
handing over a `vit_jax.source.Source`), device placement (beyond the small `prefetch_to_device`
helper), the training loop, or metrics, nor listing and decoding image files
(`vit_jax.image_folder`: one decoder for folders, tfds images and `eval_image`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from vit_jax import csv_dataset, image_folder, indexed_sources, records_source, tfds_source
from vit_jax.closable_batches import ClosableBatches
from vit_jax.csv_dataset import CSV_PREFIX, CsvSpec
from vit_jax.indexed_sources import DIGITS
from vit_jax.source import TRAIN_PARALLEL_CALLS, Source

FOLDER_PREFIX = "folder:"
RECORDS_PREFIX = records_source.PREFIX
TARGET_KINDS = ("one_hot", "multi_hot", "value")
EVAL_CROPS = ("resize", "resize_small_crop")
CROP_AREA = (0.05, 1.0)  # the Inception crop's share of the image (the original's)
_CROP_ASPECT = (3 / 4, 4 / 3)

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
        return ClosableBatches(self._dataset)

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
    num_workers: int = 0,
    crop_min_area: float = CROP_AREA[0],
) -> Iterator[Batch]:
    """Endless augmented training batches `{'image', 'label'}` shaped for `pmap`.

    With `targets='value'`: `{'image', 'target'}`, plus `'features'` for a CSV with feature
    columns. `start_step=k` yields exactly the batches an uninterrupted iterator yields from step
    k on. `shuffle_buffer` applies to tfds datasets only (the others are permuted whole, per
    epoch). `num_workers`: parallel decode-and-augment calls (0: one per CPU core).
    `crop_min_area`: the smallest share of the image the random crop keeps (MAE: 0.2).
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
    if source.global_stream is not None:  # digits, folders, CSVs, records
        ds = source.global_stream(
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
        image = _inception_crop(source.decode(example["image"]), crop_seed, crop_min_area)
        image = _resize(image, image_size)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return {"image": _normalize(image), **encode(example)}

    ds = ds.map(preprocess, num_parallel_calls=num_workers or TRAIN_PARALLEL_CALLS)
    ds = ds.batch(per_host, drop_remainder=True)
    ds = ds.map(functools.partial(_shard, devices=local_device_count, per_device=per_device))
    ds = ds.prefetch(2).with_options(_options(autotune=False))
    return ClosableBatches(ds)


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
    prefixes = (FOLDER_PREFIX, CSV_PREFIX, RECORDS_PREFIX)
    return not (dataset == DIGITS or dataset.startswith(prefixes))


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


# ----------------------------------------------------------------------------------------------
# Preprocessing (graph-mode, stateless).


def _inception_crop(image: tf.Tensor, seed: tf.Tensor, min_area: float = CROP_AREA[0]) -> tf.Tensor:
    """Random crop of `min_area` (5 %)–100 % area and aspect 3/4–4/3; else the whole image."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=_CROP_ASPECT,
        area_range=(min_area, CROP_AREA[1]),
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


def _check_targets(dataset: str, source: Source, targets: str) -> None:
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


def _target_encoder(dataset: str, source: Source, targets: str) -> Callable[[dict], dict]:
    """A raw element's label or target fields → the batch's target keys for `targets`."""
    _check_targets(dataset, source, targets)
    if source.target_names is not None:  # a CSV: its fields as they are
        return lambda ex: {k: ex[k] for k in ("target", "features") if k in ex}
    if targets == "value":
        values = tf.constant(csv_dataset.class_values(dataset, source.class_names))
        return lambda ex: {"target": tf.gather(values, ex["label"])[None]}
    multi_hot = targets == "multi_hot"
    return lambda ex: {"label": _encode_label(ex["label"], source.num_classes, multi_hot)}


def _train_values(dataset: str, source: Source) -> np.ndarray:
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
) -> Source:
    if dataset == DIGITS:
        return indexed_sources.digits_source(split, process_index, process_count)
    if dataset.startswith(FOLDER_PREFIX):
        root = dataset[len(FOLDER_PREFIX) :]
        return indexed_sources.folder_source(root, split, process_index, process_count)
    if dataset.startswith(CSV_PREFIX):
        path = dataset[len(CSV_PREFIX) :]
        spec = csv or CsvSpec()
        return indexed_sources.csv_source(path, split, spec, process_index, process_count)
    if dataset.startswith(RECORDS_PREFIX):
        directory = dataset[len(RECORDS_PREFIX) :]
        return records_source.records_source(directory, split, process_index, process_count)
    return tfds_source.load_source(
        dataset,
        split,
        process_index,
        process_count,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        shuffle_seed=shuffle_seed,
    )


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
