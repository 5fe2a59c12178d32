"""`'records:<dir>'` datasets: prepared ArrayRecord shards read with grain, as a `Source`.

This module owns reading a directory written by `python -m vit_jax.prepare_data`:
- start-up reads the manifest (and lists the directory once to check every shard is there): no
  per-record or per-file work, whatever the dataset size; each shard's reader opens on its first
  read (array_record's `ArrayRecordDataSource` given each shard's record count);
- the training order: position p of the stream holds record `keys[p]`, where `keys` is grain's
  seeded shuffle of all records, a new permutation per epoch (`MapDataset.range(n).shuffle(
  seed).repeat()`, computed per index, nothing materialised). Global batch b is positions
  [bB, (b+1)B) and process i reads its i-th contiguous part only, so the global batches are the
  same for any process count (as for the in-memory sources) and resuming at step k costs no
  reading: the stream simply starts at position kB;
- evaluation: process i reads records i, i + n, … of the split once, in order;
- records → `{'image': EncodedImage, 'label'}` elements, decoded by `vit_jax.image_folder`'s one
  decoder (TF's for what TF reads, Pillow's path for the rest): the same pixels as reading the
  original file through a `'folder:'` dataset.

Reading (a batched random-access read per global batch part) runs in tf.data's generator thread;
parsing, decoding and augmentation run in tf.data's parallel map (C++ threads, no GIL), with the
same graph-mode preprocessing as every other source (`vit_jax.input_pipeline`).

It does not own the record format and manifest checks (`vit_jax.records_format`) nor
preprocessing and batching (`vit_jax.input_pipeline`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from vit_jax import image_folder
from vit_jax import records_format as rf
from vit_jax.source import Source, check_process

PREFIX = "records:"
_EVAL_CHUNK = 256  # records read per generator step during evaluation
_OTHER_OPEN_FILES = 1024  # kept free for everything else a run opens


class EncodedImage(NamedTuple):
    """An image file's bytes and whether TF's decoder reads them (else Pillow's path)."""

    data: Any  # tf.string
    tf_decodes: Any  # tf.bool


def records_source(directory: str, split: str, process_index: int, process_count: int) -> Source:
    """The split of a prepared records directory, this process's strided share for evaluation."""
    check_process(process_index, process_count)
    directory = os.path.abspath(directory)
    manifest = rf.read_manifest(directory)
    shards = rf.check_shards(directory, manifest, split)
    n = manifest["splits"][split]["num_records"]
    if n == 0:
        raise rf.RecordsError(
            f"Split {split!r} of records directory {directory!r} has no records (every file was "
            f"skipped at preparation; the manifest lists why)."
        )
    paths = tuple(
        f"{os.path.join(directory, s['file'])}[0:{s['num_records']}]"
        for s in shards
        if s["num_records"]
    )
    _allow_open_files(len(paths), directory)
    class_names = tuple(manifest["class_names"])
    own = len(range(process_index, n, process_count))
    records = _records(paths)
    eval_ds = tf.data.Dataset.from_generator(
        functools.partial(_strided, records, process_index, process_count),
        output_signature=tf.TensorSpec([None], tf.string),
    )
    eval_ds = eval_ds.unbatch().map(_element, num_parallel_calls=tf.data.AUTOTUNE)
    return Source(
        eval_ds,
        _decode,
        own,
        -(-n // process_count),
        len(class_names),
        class_names,
        n,
        global_stream=functools.partial(_global_stream, records),
    )


@functools.cache
def _records(paths: tuple[str, ...]):
    """One data source per shard list and process: its readers stay open between iterators."""
    import grain

    return grain.sources.ArrayRecordDataSource(list(paths))


def _allow_open_files(num_shards: int, directory: str) -> None:
    """Raises this process's open-file limit to what one reader per shard needs.

    Every shard's reader stays open once used (a global batch touches most shards), and the
    usual soft limit of 1024 is below ImageNet-21k's ~14k shards of 1024 records.
    """
    import resource

    needed = num_shards + _OTHER_OPEN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise rf.RecordsError(
            f"Records directory {directory!r} has {num_shards} shards, each read through an open "
            f"file, but this process may open at most {hard} files (`ulimit -Hn`). Raise the "
            "limit, or prepare the folder again with a larger --shard_size."
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _strided(records, process_index: int, process_count: int) -> Iterator[np.ndarray]:
    keys = range(process_index, len(records), process_count)
    for start in range(0, len(keys), _EVAL_CHUNK):
        yield _as_strings(records.__getitems__(keys[start : start + _EVAL_CHUNK]))


def _global_stream(
    records,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """`(position, {'image', 'label'})` of this process's part of each global batch, raw."""
    per_host = global_batch_size // process_count

    def parts() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        keys = training_keys(len(records), seed)
        step = start_step
        while True:
            first = step * global_batch_size + process_index * per_host
            positions = np.arange(first, first + per_host, dtype=np.int64)
            own_keys = [keys[int(p)] for p in positions]
            yield positions, _as_strings(records.__getitems__(own_keys))
            step += 1

    ds = tf.data.Dataset.from_generator(
        parts,
        output_signature=(
            tf.TensorSpec([per_host], tf.int64),
            tf.TensorSpec([per_host], tf.string),
        ),
    )
    return ds.unbatch().map(lambda p, r: (p, _element(r)))


def training_keys(num_records: int, seed: int):
    """Record index at each stream position: grain's seeded shuffle, a new one per epoch.

    grain seeds epoch e with `seed + e`, so the run's seed is mixed first: seeds s and s + 1
    would otherwise shuffle alike one epoch apart.
    """
    import grain

    mixed = int(np.random.SeedSequence(seed).generate_state(1)[0] >> 1)  # [0, 2**31)
    return grain.MapDataset.range(num_records).shuffle(seed=mixed).repeat()


def _as_strings(records) -> np.ndarray:
    # An object array: NumPy's fixed-width bytes dtype would drop trailing zero bytes.
    array = np.empty(len(records), dtype=object)
    array[:] = list(records)
    return array


def _element(record: tf.Tensor) -> dict[str, Any]:
    parsed = rf.parse_record(record)
    return {"image": EncodedImage(parsed["image"], parsed["tf_decodes"]), "label": parsed["label"]}


def _decode(image: EncodedImage) -> tf.Tensor:
    return image_folder.decode_data(image.data, image.tf_decodes)
