"""What a training objective ("task") provides to the loop, and the loop nothing else.

The loop (`vit_jax.train`, `vit_jax.steps`) knows batches, devices, optimisers and checkpoints;
it does not know what a batch's targets are, which head the model needs, how a loss or a metric
is computed, or which metric is "better". A `Task` owns exactly that, so a new objective
(regression, distillation, masked-patch prediction) is a new `Task`, not a fork of the loop.

A task's methods that run inside the pmap'd steps (`train_loss`, `eval_values`) are pure
functions of their arguments; the task object itself holds only Python values (options and
dataset statistics), so it can be closed over by `jax.pmap`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import ml_collections

Metrics = dict[str, float]
ApplyFn = Callable[..., jax.Array]
Batch = Mapping[str, jax.Array]


class Task(abc.ABC):
    """One objective: targets, head, loss, evaluation sums, final metrics, predictions.

    Subclasses set the class attributes and implement the abstract methods. `config` is the
    run's config (already validated by `check_config`); `info` the dataset's
    `input_pipeline.DatasetInfo`.
    """

    name: ClassVar[str]
    losses: ClassVar[tuple[str, ...]]  # valid values of `config.loss` for this task
    best_metric: ClassVar[str]  # the validation metric `keep_best` follows
    higher_is_better: ClassVar[bool]
    trains_dist_token: ClassVar[bool] = False  # can train a distilled model's second head

    def __init__(self, config: ml_collections.ConfigDict, info: Any):
        self.config = config
        self.info = info

    # -- before any data is read ---------------------------------------------------------------

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """ValueError for options this task cannot run with (loss, task-specific keys)."""
        if config.model.get("distilled") and not cls.trains_dist_token:
            raise ValueError(
                f"{config.model.model_name} has a distillation token, whose head learns from a "
                f"teacher; task={cls.name!r} cannot train it. Train the model without it "
                f"(e.g. {config.model.model_name.removesuffix('-dist')}), fine-tune a "
                "distilled checkpoint into that plain model (the token is dropped, with a "
                "warning), or distil it from a teacher (task='distillation')."
            )
        distill = config.get("distill") or {}
        teacher = distill.get("teacher_model") or distill.get("teacher_checkpoint")
        if teacher and not cls.trains_dist_token:
            raise ValueError(
                f"distill.teacher_model/teacher_checkpoint are set, but task={cls.name!r} has "
                "no teacher; set --config.task=distillation, or unset them."
            )
        if config.loss not in cls.losses:
            raise ValueError(
                f"Unknown loss={config.loss!r} for task={cls.name!r}; valid values: "
                f"{', '.join(cls.losses)}. (Each task has its own losses: set --config.task "
                "and --config.loss together.)"
            )

    # -- data and model ------------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def targets_for(cls, config: ml_collections.ConfigDict) -> str:
        """What the input pipeline yields as targets: 'one_hot', 'multi_hot' or 'value'.

        A class method: the dataset's info, which the task is built from, depends on it.
        """

    @property
    def targets(self) -> str:
        return self.targets_for(self.config)

    @abc.abstractmethod
    def head(self) -> dict[str, Any]:
        """Model constructor arguments for the head: `num_classes` (outputs), `head_bias_init`."""

    def wrap_model(self, model: Any) -> Any:
        """The model the task trains, around the run's model (`head()` applied).

        The identity for tasks that train the model itself; a pretraining task wraps it as
        its encoder (MAE's decoder, masked patch prediction's head).
        """
        return model

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array]:
        """Keyword inputs of the model besides the images (e.g. per-image `features`)."""
        del batch
        return {}

    def step_inputs(self) -> Any:
        """Arrays every train step takes besides state, batch and rng (a teacher's params).

        The loop places them on the devices once and passes them to the step as an argument.
        Closed over instead, they would be constants of the compiled program: XLA folds them
        into the executable (compile time and memory grow with their size), and the
        persistent compilation cache would key on their values.
        """
        return None

    # -- inside the pmap'd steps ---------------------------------------------------------------

    @abc.abstractmethod
    def train_loss(
        self, apply_fn: ApplyFn, params: Any, batch: Batch, rng: jax.Array, inputs: Any = None
    ) -> jax.Array:
        """Mean training loss of one micro-batch; `rng` is this micro-batch's dropout key,
        `inputs` this device's copy of `step_inputs()`."""

    @abc.abstractmethod
    def eval_values(self, apply_fn: ApplyFn, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Per-example values [batch] the loop sums over real (unpadded) examples.

        The loop adds `count`; `metrics` turns the sums into the final numbers.
        """

    def picture(self, apply_fn: ApplyFn, params: Any, images: jax.Array) -> jax.Array | None:
        """An image of what the model makes of a few evaluation `images` (e.g. MAE's
        reconstructions), [H, W, 3] uint8, written at each evaluation; None (the default)
        for tasks with nothing to show."""
        del apply_fn, params, images
        return None

    # -- on the host ---------------------------------------------------------------------------

    @abc.abstractmethod
    def metrics(self, sums: Mapping[str, float]) -> Metrics:
        """Final metrics of one evaluation pass from the summed `eval_values` and `count`."""

    def is_better(self, new: Mapping[str, float], old: Mapping[str, float] | None) -> bool:
        """Whether `new` beats `old` on `best_metric` (any result beats none)."""
        if old is None:
            return True
        a, b = new[self.best_metric], old[self.best_metric]
        return a > b if self.higher_is_better else a < b

    @classmethod
    @abc.abstractmethod
    def summary(cls, config: ml_collections.ConfigDict, metrics: Mapping[str, float]) -> str:
        """The final result as the one line the command line prints."""

    @abc.abstractmethod
    def inference_info(self) -> dict[str, Any]:
        """What `predict` needs to turn outputs into predictions (saved as `task.json`), and
        the evaluation preprocessing (`eval_crop`), so predict sees what evaluation saw."""
