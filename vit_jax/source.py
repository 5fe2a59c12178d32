"""`Source`: one split of a dataset as every source hands it to `vit_jax.input_pipeline`.

This module owns the record shared by the sources (`vit_jax.tfds_source` for tfds datasets,
`vit_jax.indexed_sources` for the embedded digits, image folders and CSVs,
`vit_jax.records_source` for prepared records) and the pipeline that
preprocesses and batches it, and the check of a process index both sides use. It is its own
module so that neither kind of source imports the pipeline, nor the other kind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from vit_jax import image_folder

# Parallel calls of a training pipeline's maps (fixed: see `input_pipeline._options`).
TRAIN_PARALLEL_CALLS = max(1, min(os.cpu_count() or 1, 64))


@dataclasses.dataclass(frozen=True)
class Source:
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
    # Sources addressable by index (in memory, or prepared records): the training stream in one
    # global order, `(seed=, start_step=, global_batch_size=, process_index=, process_count=)` →
    # dataset of `(position, raw element)` for this process's part of each global batch; None
    # for a tfds dataset (read in order, shuffled with a buffer).
    global_stream: Callable[..., tf.data.Dataset] | None = None


def check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )
