"""The training loop: `train_and_evaluate(config, workdir)` and its pmap'd train and eval steps.

This module owns config validation, the update step (loss, gradient accumulation, cross-device
mean, optax update), evaluation that counts every test example once, fine-tuning from a
released-format `.npz` and writing the final params as `<workdir>/params.npz`. It reads the
config here and passes plain arguments to `input_pipeline`, `optim`, `models` and `checkpoint`.
Multi-phase runs (pretrain → fine-tune) are `train_phases`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state

from vit_jax import checkpoint, input_pipeline, models, models_vit, optim

LOSSES = ("softmax_xent", "sigmoid_xent")
OPTIM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EVAL_CROPS = ("resize", "resize_small_crop")
PHASE_PREFIX = "phase:"  # `pretrained = 'phase:<name>'` = the params.npz of an earlier phase
PARAMS_FILE = "params.npz"
_TOP_K = 5
_LOG = logging.getLogger(__name__)

TrainState = train_state.TrainState
Metrics = dict[str, float]


# ----------------------------------------------------------------------------------------------
# Public interface.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[TrainState, Metrics]:
    """Trains `config` in `workdir`; returns the final (host) state and the final eval metrics."""
    validate_config(config, jax.device_count(), jax.local_device_count())
    os.makedirs(workdir, exist_ok=True)
    info = input_pipeline.get_dataset_info(
        config.dataset,
        train_split=config.train_split,
        test_split=config.test_split,
        data_dir=config.data_dir or None,
    )
    model = make_model(config, info.num_classes)
    schedule = make_schedule(config)
    state = create_state(config, model, schedule)
    p_train_step = make_train_step(config, schedule)
    p_eval_step = make_eval_step(model, config.loss)
    train_iter = input_pipeline.prefetch_to_device(_train_batches(config))
    eval_batches = _eval_batches(config)

    rng = jax_utils.replicate(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    pstate = jax_utils.replicate(state)
    history: list[dict[str, jax.Array]] = []
    eval_metrics: Metrics = {}
    start = time.time()
    for step in range(1, config.total_steps + 1):
        pstate, metrics = p_train_step(pstate, next(train_iter), rng)
        history.append(metrics)
        last = step == config.total_steps
        if last or step % config.log_every == 0:
            _log_train(history, step - len(history) + 1, config.batch_size, time.time() - start)
            history, start = [], time.time()
        if last or (config.eval_every and step % config.eval_every == 0):
            eval_metrics = evaluate(p_eval_step, pstate.params, eval_batches)
            _LOG.info("step %d eval %s", step, _fmt(eval_metrics))
    state = jax.device_get(jax_utils.unreplicate(pstate))
    checkpoint.save(jax.device_get(state.params), os.path.join(workdir, PARAMS_FILE))
    return state, eval_metrics


def train_phases(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Metrics]:
    """Runs each of `config.phases` (a sub-config each) in `<workdir>/<phase>`, in order.

    A phase whose `pretrained` is `'phase:<name>'` starts from that earlier phase's params.
    Returns the final eval metrics per phase.
    """
    results = {}
    for name in config.phases:
        phase = config[name]
        if phase.pretrained.startswith(PHASE_PREFIX):
            source = phase.pretrained[len(PHASE_PREFIX) :]
            if source not in results:
                raise ValueError(
                    f"Phase {name!r} starts from phase {source!r}, which has not run before it; "
                    f"phases run in the order {tuple(config.phases)}."
                )
            phase = phase.copy_and_resolve_references()
            phase.pretrained = os.path.join(workdir, source)
        _LOG.info("phase %s", name)
        _, results[name] = train_and_evaluate(phase, os.path.join(workdir, name))
    return results


def validate_config(
    config: ml_collections.ConfigDict, device_count: int, local_device_count: int
) -> None:
    """Raises ValueError for a config the loop cannot run, saying what to change."""
    if config.batch_size <= 0 or config.batch_size % device_count:
        raise ValueError(
            f"batch_size={config.batch_size} must be a positive multiple of the device count "
            f"({device_count})."
        )
    per_device = config.batch_size // device_count
    if config.accum_steps <= 0 or per_device % config.accum_steps:
        raise ValueError(
            f"The per-device batch ({config.batch_size} / {device_count} devices = {per_device}) "
            f"must be divisible by accum_steps={config.accum_steps}."
        )
    _check_choice("loss", config.loss, LOSSES)
    _check_choice("optimizer", config.optimizer, optim.OPTIMIZERS)
    _check_choice("decay_type", config.decay_type, optim.DECAY_TYPES)
    _check_choice("optim_dtype", config.optim_dtype, tuple(OPTIM_DTYPES))
    _check_choice("eval_crop", config.eval_crop, EVAL_CROPS)
    if config.label_smoothing and config.loss != "softmax_xent":
        raise ValueError("label_smoothing applies to loss='softmax_xent' only.")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}.")
    for key in ("total_steps", "log_every"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {config[key]}.")
    if config.eval_every < 0:
        raise ValueError(f"eval_every must be ≥ 0 (0 = only at the end), got {config.eval_every}.")
    _check_patch_grid(config.model, config.image_size)
    make_schedule(config)  # checks lr, warmup and total steps


def make_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model of `config.model` with a head of `num_classes`."""
    name = config.model.model_name
    return models.model_class(name)(**{**config.model.to_dict(), "num_classes": num_classes})


def make_schedule(config: ml_collections.ConfigDict) -> optim.Schedule:
    return optim.learning_rate_schedule(
        base_lr=config.base_lr,
        total_steps=config.total_steps,
        warmup_steps=config.warmup_steps,
        decay_type=config.decay_type,
        linear_end=config.linear_end,
    )


def make_optimizer(config: ml_collections.ConfigDict, schedule: optim.Schedule):
    return optim.make_optimizer(
        config.optimizer,
        schedule,
        grad_clip_norm=config.grad_clip_norm or None,
        momentum=config.momentum,
        accumulator_dtype=OPTIM_DTYPES[config.optim_dtype],
        b1=config.adam_b1,
        b2=config.adam_b2,
        weight_decay=config.weight_decay,
    )


def create_state(config: ml_collections.ConfigDict, model, schedule) -> TrainState:
    """Fresh (or `config.pretrained`) params and optimizer state, on the host."""
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    init = jax.jit(lambda rng: model.init(rng, dummy, train=False)["params"])
    params = init(jax.random.PRNGKey(config.seed))
    if config.pretrained:
        params = checkpoint.load_pretrained(
            pretrained_path=_pretrained_file(config.pretrained),
            init_params=jax.device_get(params),
            model_config=config.model,
        )
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=make_optimizer(config, schedule)
    )


# ----------------------------------------------------------------------------------------------
# Steps (pure; transformed in make_train_step / make_eval_step only).


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    schedule: optim.Schedule,
    loss_name: str,
    accum_steps: int,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on this device's batch: averaged micro-batch grads, mean over 'batch' devices.

    Dropout keys differ per step, device and micro-batch. Metrics are identical on all devices.
    """
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index("batch"))

    def micro_grads(params, micro_batch, key):
        def loss_fn(p):
            logits = state.apply_fn(
                {"params": p}, micro_batch["image"], train=True, rngs={"dropout": key}
            )
            return compute_loss(logits, micro_batch["label"], loss_name, label_smoothing).mean()

        return jax.value_and_grad(loss_fn)(params)

    loss, grads = accumulate_gradients(micro_grads, state.params, batch, rng, accum_steps)
    grads = jax.lax.pmean(grads, axis_name="batch")
    loss = jax.lax.pmean(loss, axis_name="batch")
    new_state = state.apply_gradients(grads=grads)
    metrics = {
        "loss": loss,
        "lr": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new_state.params),
    }
    return new_state, metrics


def accumulate_gradients(
    grad_fn: Callable, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, accum_steps: int
) -> tuple[jax.Array, Any]:
    """Mean loss and mean gradient of `grad_fn` over `accum_steps` equal micro-batches.

    Micro-batch i gets dropout key fold_in(rng, i). With equal micro-batches the mean of the
    micro-batch means equals the full-batch mean, so SGD sees the same update.
    """
    if accum_steps == 1:
        return grad_fn(params, batch, jax.random.fold_in(rng, 0))
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, -1, *x.shape[1:])), batch)

    def body(carry, i):
        loss_sum, grad_sum = carry
        micro_batch = jax.tree.map(lambda x: x[i], micro)
        loss, grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, i))
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, grad_sum), _ = jax.lax.scan(body, zeros, jnp.arange(accum_steps))
    return loss_sum / accum_steps, jax.tree.map(lambda g: g / accum_steps, grad_sum)


def compute_loss(
    logits: jax.Array, labels: jax.Array, loss_name: str, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example loss: softmax cross-entropy (optionally smoothed) or summed sigmoid xent."""
    if loss_name == "softmax_xent":
        if label_smoothing:
            labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
        return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)
    if loss_name == "sigmoid_xent":
        return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)
    raise ValueError(f"Unknown loss {loss_name!r}; valid values: {LOSSES}.")


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, apply_fn, loss_name: str):
    """Mask-weighted sums over all devices: top-1/top-5 hits, loss and example count.

    A prediction is a hit when its class is among the labels (one-hot or multi-hot).
    """
    logits = apply_fn({"params": params}, batch["image"], train=False)
    labels, mask = batch["label"], batch["mask"]
    k = min(_TOP_K, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    hits = jnp.take_along_axis(labels, top, axis=-1) > 0
    sums = {
        "correct_top1": jnp.sum(hits[:, 0] * mask),
        "correct_top5": jnp.sum(jnp.any(hits, axis=-1) * mask),
        "loss": jnp.sum(compute_loss(logits, labels, loss_name) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, axis_name="batch")


def make_train_step(config: ml_collections.ConfigDict, schedule: optim.Schedule):
    """`train_step` pmap'd over local devices (axis 'batch'), the state buffers donated."""
    step = functools.partial(
        train_step,
        schedule=schedule,
        loss_name=config.loss,
        accum_steps=config.accum_steps,
        label_smoothing=config.label_smoothing,
    )
    return jax.pmap(step, axis_name="batch", donate_argnums=(0,))


def make_eval_step(model, loss_name: str):
    step = functools.partial(eval_step, apply_fn=model.apply, loss_name=loss_name)
    return jax.pmap(step, axis_name="batch")


def evaluate(p_eval_step, params, batches: Iterable) -> Metrics:
    """top-1/top-5 accuracy, mean loss and the number of examples counted, over one pass."""
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(jax_utils.unreplicate(p_eval_step(params, batch)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = totals["count"]
    return {
        "accuracy": totals["correct_top1"] / count,
        "accuracy_top5": totals["correct_top5"] / count,
        "loss": totals["loss"] / count,
        "count": count,
    }


# ----------------------------------------------------------------------------------------------
# Helpers.


def _train_batches(config: ml_collections.ConfigDict):
    return input_pipeline.get_train_iterator(
        config.dataset,
        config.train_split,
        image_size=config.image_size,
        global_batch_size=config.batch_size,
        local_device_count=jax.local_device_count(),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_dir=config.data_dir or None,
        shuffle_buffer=config.shuffle_buffer,
        multi_hot=config.loss == "sigmoid_xent",
    )


def _eval_batches(config: ml_collections.ConfigDict):
    return input_pipeline.get_eval_iterator(
        config.dataset,
        config.test_split,
        image_size=config.image_size,
        global_batch_size=config.batch_size,
        local_device_count=jax.local_device_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_dir=config.data_dir or None,
        eval_crop=config.eval_crop,
        multi_hot=config.loss == "sigmoid_xent",
    )


def _log_train(history: list, first_step: int, batch_size: int, seconds: float) -> None:
    """Logs the last of `history`; raises if any step's loss was not finite."""
    values = jax.device_get([jax.tree.map(lambda x: x[0], m) for m in history])
    for offset, metrics in enumerate(values):
        if not np.isfinite(metrics["loss"]):
            step = first_step + offset
            raise FloatingPointError(
                f"Non-finite training loss {metrics['loss']} at step {step}; lower base_lr, "
                "check the data, or raise warmup_steps."
            )
    step = first_step + len(values) - 1
    img_per_s = len(values) * batch_size / max(seconds, 1e-9)
    shown = {k: float(v) for k, v in values[-1].items()}
    _LOG.info("step %d %s img/s=%.1f", step, _fmt(shown), img_per_s)


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {key}={value!r}; valid values: {', '.join(valid)}.")


def _check_patch_grid(model_config: ml_collections.ConfigDict, image_size: int) -> None:
    """Image size must tile into patches (after the hybrid stem's stride); Mixer has no stem."""
    resnet = model_config.get("resnet")
    models_vit.check_image_size(
        (image_size, image_size),
        tuple(model_config.patches.size),
        models_vit.stem_stride(resnet),
        model_config.model_name,
    )


def _pretrained_file(path: str) -> str:
    """`path` itself, or `<path>/params.npz` when `path` is a workdir."""
    return os.path.join(path, PARAMS_FILE) if os.path.isdir(path) else path
