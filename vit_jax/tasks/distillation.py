"""DeiT's distillation: a student classifier that also learns from a trained teacher.

The teacher is any zoo model with a checkpoint (`distill.teacher_model`,
`distill.teacher_checkpoint`: a released-format `.npz` or a training workdir), fitted to it as
`predict` fits one (its classes, tokens and resolution read from the file). Inside the train
step it runs in evaluation mode, under `stop_gradient`, on the same augmented (mixed) batch as
the student, resized to the teacher's resolution when that differs. Its params are the task's
`step_inputs()`: an argument of the compiled step, not a constant inside it.

The losses, per example (Touvron et al. 2020; Z_s the class-token logits, Z_d the
distillation-token logits, Z_t the teacher's, y the (mixed, smoothed) label):
- hard: ½·CE(Z_s, y) + ½·CE(Z_d, argmax Z_t);
- soft: (1−α)·CE(Z_s, y) + α·τ²·KL(softmax(Z_t/τ) ‖ softmax(Z_d/τ)), α = 0.1, τ = 3 by default.
The KL is summed over classes and averaged over the batch, as in the paper's formula (DeiT's
released code divides the summed KL by batch × classes instead, i.e. α/classes).
A distilled student (`DeiT-*-dist`) puts each term on its own head; a plain student puts both on
its one head (classic knowledge distillation). Evaluation, metrics and `predict` are those of
classification: a distilled model is evaluated on the mean of its two heads' logits.
"""

from __future__ import annotations

import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import checkpoint, checkpoint_geometry, models, weights_info
from vit_jax.tasks.base import ApplyFn, Batch
from vit_jax.tasks.classification import Classification, compute_loss

KINDS = ("hard", "soft")
HARD_WEIGHT = 0.5  # the paper's ½ + ½


class Distillation(Classification):
    """Classification plus a teacher's targets for the distillation head (DeiT)."""

    name = "distillation"
    trains_dist_token = True

    def __init__(self, config: ml_collections.ConfigDict, info: Any):
        super().__init__(config, info)
        options = config.distill
        self.kind, self.alpha, self.tau = options.type, float(options.alpha), float(options.tau)
        self.teacher, self._teacher_params, self.teacher_size = load_teacher(
            config, info.num_classes
        )

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        super().check_config(config)
        options = config.distill
        if config.loss != "softmax_xent":
            raise ValueError(
                f"task='distillation' learns softmax outputs; got loss={config.loss!r}. Set "
                "--config.loss=softmax_xent."
            )
        if options.type not in KINDS:
            raise ValueError(
                f"Unknown distill.type={options.type!r}; valid values: {', '.join(KINDS)}."
            )
        for key in ("teacher_model", "teacher_checkpoint"):
            if not options[key]:
                raise ValueError(
                    f"task='distillation' needs a teacher: set --config.distill.{key} "
                    "(teacher_model: its zoo name; teacher_checkpoint: its trained params, a "
                    ".npz file or a training workdir)."
                )
        models.get_config(options.teacher_model)  # unknown names fail listing close ones
        if not 0.0 <= options.alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {options.alpha}.")
        if not options.tau > 0:
            raise ValueError(f"distill.tau must be > 0, got {options.tau}.")
        if options.teacher_image_size < 0:
            raise ValueError(
                f"distill.teacher_image_size must be ≥ 0 (0 = the checkpoint's own), got "
                f"{options.teacher_image_size}."
            )
        _teacher_overrides(options.teacher_overrides)

    def step_inputs(self) -> Any:
        """The teacher's params (on the host)."""
        return self._teacher_params

    def train_loss(
        self, apply_fn: ApplyFn, params: Any, batch: Batch, rng: jax.Array, inputs: Any = None
    ) -> jax.Array:
        images, labels = self.augment(batch["image"], batch["label"], rng)
        outputs = apply_fn({"params": params}, images, train=True, rngs={"dropout": rng})
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        teacher_images = images
        if self.teacher_size != images.shape[1]:
            shape = (images.shape[0], self.teacher_size, self.teacher_size, images.shape[3])
            teacher_images = jax.image.resize(images, shape, "bilinear")
        teacher_logits = jax.lax.stop_gradient(
            self.teacher.apply({"params": inputs}, teacher_images, train=False)
        )
        base = compute_loss(cls_logits, labels, "softmax_xent", self.config.label_smoothing)
        if self.kind == "hard":
            loss = hard_distillation_loss(base, dist_logits, teacher_logits)
        else:
            loss = soft_distillation_loss(base, dist_logits, teacher_logits, self.alpha, self.tau)
        return loss.mean()

    def inference_info(self) -> dict[str, Any]:
        # predict reads a distilled classifier's outputs as any classifier's.
        return {**super().inference_info(), "task": Classification.name}


def hard_distillation_loss(
    base: jax.Array, dist_logits: jax.Array, teacher_logits: jax.Array
) -> jax.Array:
    """½·base + ½·CE(dist_logits, argmax teacher), per example (`base`: CE(Z_s, y))."""
    teacher_labels = jax.nn.one_hot(jnp.argmax(teacher_logits, axis=-1), dist_logits.shape[-1])
    return HARD_WEIGHT * base + (1 - HARD_WEIGHT) * compute_loss(
        dist_logits, teacher_labels, "softmax_xent"
    )


def soft_distillation_loss(
    base: jax.Array, dist_logits: jax.Array, teacher_logits: jax.Array, alpha: float, tau: float
) -> jax.Array:
    """(1−α)·base + α·τ²·KL(softmax(Z_t/τ) ‖ softmax(Z_d/τ)), per example."""
    log_p_teacher = jax.nn.log_softmax(teacher_logits / tau)
    log_p_student = jax.nn.log_softmax(dist_logits / tau)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return (1 - alpha) * base + alpha * tau**2 * kl


def load_teacher(config: ml_collections.ConfigDict, num_classes: int) -> tuple[nn.Module, Any, int]:
    """(teacher module, its params, its input size) from `config.distill`.

    The checkpoint is fitted to the zoo model as `predict` fits one: class count, distillation
    token and representation layer read from the file, its resolution from the position table
    (or `teacher_image_size`, the table then resampled), `teacher_overrides` (JSON) for a
    non-zoo architecture; anything else that differs is one error listing all of it. The
    teacher must predict this dataset's `num_classes`.
    """
    options = config.distill
    name, path = options.teacher_model, options.teacher_checkpoint
    where = f"the teacher (distill.teacher_model={name!r}, distill.teacher_checkpoint={path!r})"
    overrides = _teacher_overrides(options.teacher_overrides)
    if config.compute_dtype != "float32":
        overrides.setdefault("dtype", jnp.dtype(config.compute_dtype))
    try:
        params_file = checkpoint.resolve_params_file(path)
        model, params, size = checkpoint_geometry.model_for_checkpoint(
            checkpoint.load(params_file),
            name,
            image_size=options.teacher_image_size or None,
            **overrides,
        )
        norm = getattr(model, "input_norm", weights_info.DEFAULT_INPUT_NORM)
        weights_info.check_input_norm(params_file, norm, f"model {name!r}")
    except (checkpoint.CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        raise type(e)(f"Cannot use {where}: {e}") from None
    if model.num_classes != num_classes:
        raise checkpoint.CheckpointError(
            f"Cannot use {where}: it predicts {model.num_classes} classes, the dataset has "
            f"{num_classes}. A teacher must be trained on the student's classes."
        )
    return model, params, size


def _teacher_overrides(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        overrides = e
    if not isinstance(overrides, dict):
        raise ValueError(
            f"distill.teacher_overrides={text!r} must be a JSON object of model overrides, "
            """e.g. '{"patches": {"size": [4, 4]}}'."""
        )
    return overrides
