"""From a run config to its data: the dataset's info, training and evaluation batches, few-shot.

The data half of what the loop builds from `config` (`vit_jax.run_config` builds the model and
the optimizer and checks the config); it is the part that reads files and imports TensorFlow
(through `vit_jax.input_pipeline`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vit_jax import fewshot, input_pipeline, multihost, run_config, tasks
from vit_jax.csv_dataset import CSV_PREFIX


def dataset_info(config: ml_collections.ConfigDict) -> input_pipeline.DatasetInfo:
    """The dataset's info; a tfds dataset's is read by process 0 before the others.

    A tfds dataset not prepared yet is so downloaded and prepared by one process, not by every
    process at once into the same data_dir. An image folder is validated by all processes
    together (each decodes its share of the files).
    """
    prepare_first = input_pipeline.needs_preparation(config.dataset)
    if prepare_first and not multihost.is_main_process():
        multihost.barrier("dataset-prepared")  # wait for process 0's download and preparation
    with run_config.csv_keys_named():
        info = input_pipeline.get_dataset_info(
            config.dataset,
            train_split=config.train_split,
            test_split=config.test_split,
            targets=tasks.task_class(config).targets_for(config),
            **_source_args(config),
        )
    if prepare_first and multihost.is_main_process():
        multihost.barrier("dataset-prepared")
    return info


def train_batches(config: ml_collections.ConfigDict, task: tasks.Task, start_step: int = 0):
    """Endless training batches from `start_step` on, shaped for the pmap'd step."""
    return input_pipeline.get_train_iterator(
        config.dataset,
        config.train_split,
        seed=config.seed,
        start_step=start_step,
        shuffle_buffer=config.shuffle_buffer,
        num_workers=config.input_workers,
        crop_min_area=config.crop_min_area,
        **_pipeline_args(config, task),
    )


def eval_batches(config: ml_collections.ConfigDict, task: tasks.Task):
    """One re-iterable pass over `test_split`, padded and masked."""
    return input_pipeline.get_eval_iterator(
        config.dataset,
        config.test_split,
        eval_crop=config.eval_crop,
        **_pipeline_args(config, task),
    )


def fewshot_evaluator(config: ml_collections.ConfigDict) -> fewshot.Evaluator | None:
    """The run's few-shot evaluator (`config.fewshot`), or None when it is off."""
    if not config.fewshot.every:
        return None
    dataset = config.fewshot.dataset or config.dataset

    def batches(split: str):
        return input_pipeline.get_eval_iterator(
            dataset,
            split,
            image_size=config.image_size,
            global_batch_size=config.batch_size,
            local_device_count=jax.local_device_count(),
            eval_crop=config.eval_crop,
            targets="one_hot",
            **_source_args(config),
        )

    features_model = run_config.make_model(config, num_classes=0)  # pooled as config.model, no head
    options = config.fewshot.copy_and_resolve_references()
    if not config.fewshot.dataset:  # the run's dataset: its splits unless others are named
        options.train_split = options.train_split or config.train_split
        options.test_split = options.test_split or config.test_split
    return fewshot.Evaluator(options, features_model, batches)


def _source_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Where the dataset is and which share of it this process reads."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "data_dir": config.data_dir or None,
        "manual_dir": config.manual_dir or None,
        "csv": run_config.csv_spec(config) if config.dataset.startswith(CSV_PREFIX) else None,
    }


def _pipeline_args(config: ml_collections.ConfigDict, task: tasks.Task) -> dict[str, Any]:
    """The input-pipeline arguments shared by training and evaluation batches."""
    return {
        "image_size": config.image_size,
        "global_batch_size": config.batch_size,
        "local_device_count": jax.local_device_count(),
        "targets": task.targets,
        **_source_args(config),
    }
