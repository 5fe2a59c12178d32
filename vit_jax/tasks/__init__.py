"""Training objectives: `config.task` names one; the loop asks it everything task-specific.

`check_config(config)` validates the task's options with the rest of the config, before any
data is read; `make_task(config, info)` builds the task once the dataset's info is known.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vit_jax.tasks.base import Metrics, Task
from vit_jax.tasks.classification import Classification
from vit_jax.tasks.distillation import Distillation
from vit_jax.tasks.regression import Regression
from vit_jax.tasks.self_supervised import MaskedAutoencoding, MaskedPatchPrediction

TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (Classification, Regression, Distillation, MaskedAutoencoding, MaskedPatchPrediction)
}
INFO_FILE = "task.json"  # beside params.npz: what `predict` needs to read the outputs

__all__ = [
    "INFO_FILE",
    "TASKS",
    "Classification",
    "Distillation",
    "MaskedAutoencoding",
    "MaskedPatchPrediction",
    "Metrics",
    "Regression",
    "Task",
]


def task_class(config: ml_collections.ConfigDict) -> type[Task]:
    """The class of `config.task`; ValueError listing the valid names."""
    name = config.get("task", "classification")
    if name not in TASKS:
        raise ValueError(f"Unknown task={name!r}; valid values: {', '.join(TASKS)}.")
    return TASKS[name]


def check_config(config: ml_collections.ConfigDict) -> None:
    """The task's own checks of `config` (its loss and options)."""
    task_class(config).check_config(config)


def make_task(config: ml_collections.ConfigDict, info: Any) -> Task:
    """The task of `config.task` for the dataset described by `info` (a DatasetInfo)."""
    return task_class(config)(config, info)
