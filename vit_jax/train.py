"""The training loop: `train_and_evaluate(config, workdir)` and its pmap'd train and eval steps.

This module owns config validation, the update step (loss, mixup, gradient accumulation,
cross-device mean, optax update), evaluation that counts every test example once, fine-tuning
from a released-format `.npz`, resumable checkpoints, metrics and the final params as
`<workdir>/params.npz`. It reads the config here and passes plain arguments to
`input_pipeline`, `optim`, `models` and `checkpoint`. Multi-phase runs (pretrain → fine-tune) are
`train_phases`.

What a run leaves in its workdir:
- `checkpoints/<step>/`: resumable state (params, optimizer state, step, rng, data position),
  written by orbax into a temporary directory that is renamed when complete; the last
  `keep_checkpoints` are kept. A run restarted with the same workdir resumes from the latest
  readable one (an unreadable one is moved to `checkpoints_unreadable/` with a warning).
- TensorBoard event files (train loss, lr, grad/param norm, img/s/core, steps/s, eval
  accuracy/top-5/loss, the hyper-parameters once) and `train.log` (the run's log lines).
- `params.npz`: the final params in the released format.

Several processes (hosts) run the same loop on their own devices and data (`multihost`): the
steps' collectives are global, and files every process would write alike are written by
process 0 (orbax coordinates the checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, periodic_actions
from flax import jax_utils
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import checkpoint, input_pipeline, models, models_vit, multihost, optim

LOSSES = ("softmax_xent", "sigmoid_xent")
OPTIM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPUTE_DTYPES = OPTIM_DTYPES
EVAL_CROPS = ("resize", "resize_small_crop")
PHASE_PREFIX = "phase:"  # `pretrained = 'phase:<name>'` = the params.npz of an earlier phase
PARAMS_FILE = checkpoint.PARAMS_FILE
CHECKPOINT_DIR = "checkpoints"  # resumable checkpoints, one sub-directory per step
UNREADABLE_DIR = "checkpoints_unreadable"  # where unreadable checkpoints are moved aside
LOG_FILE = "train.log"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_FINITE_METRICS = ("loss", "grad_norm", "param_norm")  # all finite ⇒ the new state is finite
_MIXUP_STREAM = 1  # fold_in constant separating the mixup key from the dropout key
_TOP_K = 5
_LOG = logging.getLogger(__name__)

TrainState = train_state.TrainState
Metrics = dict[str, float]


class TrainingInterrupted(SystemExit):
    """Raised after SIGTERM/SIGINT, once the checkpoint of the step in progress is written.

    A `SystemExit` whose exit status is 128 + the signal number (143 for SIGTERM, 130 for
    SIGINT), so the command line ends without a traceback or a final result; rerunning the same
    command resumes from the checkpoint.
    """

    def __init__(self, signum: int, step: int, directory: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.directory = signum, step, directory

    def __str__(self) -> str:
        return (
            f"Training stopped by {signal.Signals(self.signum).name} after step {self.step}; "
            f"its checkpoint is in {self.directory}. Rerun the same command to resume."
        )


# ----------------------------------------------------------------------------------------------
# Public interface.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, phase: str = ""
) -> tuple[TrainState, Metrics]:
    """Trains `config` in `workdir`; returns the final (host) state and the final eval metrics.

    Resumes from the latest readable checkpoint in `<workdir>/checkpoints`; a run that already
    reached `total_steps` is evaluated, not trained again. Raises `TrainingInterrupted` after
    SIGTERM/SIGINT (a checkpoint is written first) and FloatingPointError naming the step when
    the loss is not finite (no checkpoint holds non-finite values). Any error that stops the run
    is also written to `train.log`. `phase` names the run in its first log line.
    """
    validate_config(config, jax.device_count(), jax.local_device_count())
    make_workdir(workdir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_log_to_file(workdir))
        _LOG.info("%s", describe_run(config, phase))
        try:
            writers = stack.enter_context(_metric_writers(workdir))
            checkpoints = stack.enter_context(
                Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
            )
            return _run(config, workdir, writers, checkpoints, phase)
        except Exception as e:
            _LOG.error("The run stopped: %s: %s", type(e).__name__, e, extra={"file_only": True})
            raise


def train_phases(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Metrics]:
    """Runs each of `config.phases` (a sub-config each) in `<workdir>/<phase>`, in order.

    A phase whose `pretrained` is `'phase:<name>'` starts from that earlier phase's params.
    Every phase's config is checked before the first one starts. Returns the final eval
    metrics per phase. Completed phases are not trained again.
    """
    phases = resolve_phases(config, workdir)
    make_workdir(workdir)
    results = {}
    for name, phase in phases.items():
        _, results[name] = train_and_evaluate(phase, os.path.join(workdir, name), phase=name)
    return results


def resolve_phases(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, ml_collections.ConfigDict]:
    """`{phase: config}` in run order, `'phase:<name>'` resolved to `<workdir>/<name>`.

    Each phase is validated here (ValueError naming the phase and its key, e.g.
    `config.finetune.base_lr`), so a bad later phase fails before an earlier one trains.
    """
    phases = {}
    for name in config.phases:
        phase = config[name]
        from_phase = phase.pretrained.startswith(PHASE_PREFIX)
        if from_phase:
            source = phase.pretrained[len(PHASE_PREFIX) :]
            if source not in phases:
                raise ValueError(
                    f"Phase {name!r} starts from phase {source!r}, which does not run before "
                    f"it; phases run in the order {tuple(config.phases)}."
                )
            phase = phase.copy_and_resolve_references()
            phase.pretrained = os.path.join(workdir, source)
        try:
            validate_config(phase, jax.device_count(), jax.local_device_count())
            resuming = os.path.isdir(os.path.join(workdir, name, CHECKPOINT_DIR))
            if phase.pretrained and not from_phase and not resuming:
                checkpoint.check_exists(checkpoint.resolve_params_file(phase.pretrained))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"Phase {name!r} (--config.{name}.<key>): {e}") from None
        phases[name] = phase
    return phases


def make_workdir(workdir: str) -> None:
    """Creates `workdir` (and its parents); ValueError naming the path when it cannot be one."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(
            f"workdir {workdir!r} cannot be a directory: it, or a folder above it, is a file. "
            "Pass a directory path (it is created if missing)."
        ) from None
    except PermissionError as e:
        raise ValueError(
            f"workdir {workdir!r} cannot be created: permission denied for {e.filename!r}. "
            "Pass a directory you can write to."
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {workdir!r} is not writable; pass a directory you can write to.")


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
    models.check_model_config(config.model)
    _check_model_options(config)
    if config.label_smoothing and config.loss != "softmax_xent":
        raise ValueError("label_smoothing applies to loss='softmax_xent' only.")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}.")
    if not (config.mixup_alpha >= 0.0 and math.isfinite(config.mixup_alpha)):
        raise ValueError(f"mixup_alpha must be ≥ 0 (0 = no mixup), got {config.mixup_alpha}.")
    for key in ("total_steps", "log_every", "keep_checkpoints"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {config[key]}.")
    for key in ("eval_every", "checkpoint_every"):
        if config[key] < 0:
            raise ValueError(f"{key} must be ≥ 0 (0 = only at the end), got {config[key]}.")
    _check_patch_grid(config.model, config.image_size)
    make_optimizer(config, make_schedule(config))  # lr, warmup, steps, optimizer options


def describe_run(config: ml_collections.ConfigDict, phase: str = "") -> str:
    """One line saying what is trained on what: model, dataset, image size, steps, devices."""
    model = config.model
    if "transformer" in model:
        t = model.transformer
        shape = f"width {model.hidden_size}, {t.num_layers} layers, {t.num_heads} heads"
    else:
        shape = f"width {model.hidden_dim}, {model.num_blocks} blocks"
    patch = "×".join(map(str, model.patches.size))
    start = f", from {config.pretrained}" if config.pretrained else ", from scratch"
    devices = f"{jax.device_count()} device{'s' * (jax.device_count() > 1)}"
    if jax.process_count() > 1:
        devices += f" in {jax.process_count()} processes"
    return (
        f"{phase + ': ' if phase else ''}training {model.model_name} ({shape}, {patch} px "
        f"patches) on {config.dataset} [{config.train_split}] at {config.image_size} px, "
        f"{config.total_steps:,} steps of batch {config.batch_size} on {devices}{start}; "
        f"evaluating on [{config.test_split}]"
    )


def make_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model of `config.model` with a head of `num_classes` and the config's speed options."""
    name = config.model.model_name
    return models.model_class(name)(
        **{**config.model.to_dict(), **model_options(config), "num_classes": num_classes}
    )


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Model options from `compute_dtype`, `attention_impl`, `remat_policy`, `scan_layers`,
    `batch_chunks`, `matmul_dtype`.

    Only options that differ from the model's defaults are returned, so a Mixer (which has
    `dtype` only) is built unchanged unless it asks for bfloat16.
    """
    options: dict[str, Any] = {}
    if config.compute_dtype != "float32":
        options["dtype"] = COMPUTE_DTYPES[config.compute_dtype]
    if config.attention_impl != "flax":
        options["attention_impl"] = config.attention_impl
    if config.remat_policy:
        options["remat_policy"] = config.remat_policy
    if config.scan_layers:
        options["scan"] = True
    if config.batch_chunks != 1:
        options["batch_chunks"] = config.batch_chunks
    if config.matmul_dtype:
        options["matmul_dtype"] = COMPUTE_DTYPES[config.matmul_dtype]
    return options


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


def create_state(
    config: ml_collections.ConfigDict, model, schedule, *, load_pretrained: bool = True
) -> TrainState:
    """Fresh (or `config.pretrained`) params and optimizer state, on the host.

    `load_pretrained=False` skips reading `config.pretrained` (a resumed run overwrites them).
    """
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    init = jax.jit(lambda rng: model.init(rng, dummy, train=False)["params"])
    params = init(jax.random.PRNGKey(config.seed))
    if config.pretrained and load_pretrained:
        params = checkpoint.load_pretrained(
            pretrained_path=checkpoint.resolve_params_file(config.pretrained),
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
    mixup_alpha: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on this device's batch: averaged micro-batch grads, mean over 'batch' devices.

    Dropout keys differ per step, device and micro-batch. With `mixup_alpha > 0` each
    micro-batch is mixed with itself reversed (`mixup`), its λ drawn from a key separate from the
    dropout key. Metrics are identical on all devices.
    """
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index("batch"))

    def micro_grads(params, micro_batch, key):
        images, labels = micro_batch["image"], micro_batch["label"]
        if mixup_alpha > 0:
            images, labels = mixup(
                images, labels, jax.random.fold_in(key, _MIXUP_STREAM), mixup_alpha
            )

        def loss_fn(p):
            logits = state.apply_fn({"params": p}, images, train=True, rngs={"dropout": key})
            return compute_loss(logits, labels, loss_name, label_smoothing).mean()

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


def mixup(
    images: jax.Array, labels: jax.Array, key: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Mixes the batch with itself reversed: λ·x + (1-λ)·x[::-1], one λ ~ Beta(α, α).

    Images and labels get the same λ, so one-hot labels stay distributions (sum 1).
    """
    lam = jax.random.beta(key, alpha, alpha).astype(images.dtype)

    def mix(x):
        return lam * x + (1.0 - lam) * jnp.flip(x, axis=0)

    return mix(images), mix(labels).astype(labels.dtype)


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


def replicate(tree: Any) -> Any:
    """`tree` copied to every local device, laid out as the pmap'd steps lay out their outputs.

    The steps return arrays sharded over a mesh axis named 'batch'; flax's
    `jax_utils.replicate` uses another axis name, so a state it placed would make the second
    step (fed the first step's outputs) trace and compile the step again: 8-11 s per run on
    2 cores. Placed this way, each step and the final evaluation compile once.
    """
    sharding = NamedSharding(Mesh(np.array(jax.local_devices()), ("batch",)), P("batch"))
    count = jax.local_device_count()

    def put(x):  # on the host: jnp ops here would compile one broadcast per leaf shape
        x = np.asarray(x)
        x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
        return jax.device_put(np.broadcast_to(x, (count, *x.shape)), sharding)

    return jax.tree.map(put, tree)


def make_train_step(config: ml_collections.ConfigDict, schedule: optim.Schedule):
    """`train_step` pmap'd over local devices (axis 'batch'), the state buffers donated."""
    step = functools.partial(
        train_step,
        schedule=schedule,
        loss_name=config.loss,
        accum_steps=config.accum_steps,
        label_smoothing=config.label_smoothing,
        mixup_alpha=config.mixup_alpha,
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
# Resumable checkpoints.


class Checkpoints:
    """Resumable training checkpoints in `directory` (orbax, synchronous saves).

    Each step directory holds `state` (params, opt_state, step, rng) and `meta` (JSON: step and
    data_step, the `start_step` of the data stream). Orbax writes `<step>.orbax-checkpoint-tmp`
    and renames it when complete, so a killed save never looks like a checkpoint; such leftovers
    are removed with a warning when the directory is opened. Use as a context manager.
    """

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        if multihost.is_main_process():
            _remove_half_written(self.directory)
        multihost.barrier("checkpoints-opened")  # no process lists a half-written one
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info) -> None:
        self._manager.close()  # waits for anything outstanding

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, rng: jax.Array) -> None:
        """Writes the (unreplicated) `state` and `rng` of `step`; returns once it is on disk."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state, rng)),
            meta=ocp.args.JsonSave({"step": step, "data_step": step}),
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        _LOG.info("Checkpoint of step %d saved in %s.", step, self.directory)

    def restore_latest(
        self, state: TrainState, rng: jax.Array
    ) -> tuple[TrainState, jax.Array, int]:
        """(state, rng, data_step) of the latest readable checkpoint; `state`/`rng` give the tree.

        A checkpoint that fails to restore, or restores non-finite or mis-shaped values, is
        reported with a warning and the previous one is tried; once one restores, the unreadable
        newer ones are moved to `<workdir>/checkpoints_unreadable/`. Raises RuntimeError when
        none is readable (nothing is moved then).
        """
        target = _state_tree(state, rng)
        failures = []
        for step in reversed(self.steps()):
            try:
                tree, data_step = self._restore(step, target)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                _LOG.warning(
                    "Checkpoint of step %d in %s is unreadable (%s); trying the previous one.",
                    step,
                    self.directory,
                    reason,
                )
                failures.append((step, reason))
                continue
            for bad, _ in failures:
                self._move_aside(bad)
            restored = state.replace(
                step=tree["step"], params=tree["params"], opt_state=tree["opt_state"]
            )
            return restored, tree["rng"], data_step
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise RuntimeError(
            f"No checkpoint in {self.directory} can be restored for this config ({listing}). "
            "If the config changed, use a new workdir; otherwise move the directory away to "
            "start over."
        )

    def _restore(self, step: int, target: dict) -> tuple[dict, int]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        tree, meta = restored["state"], restored["meta"]
        if meta.get("step") != step or int(tree["step"]) != step:
            raise ValueError(f"metadata says step {meta.get('step')}, state step {tree['step']}")
        _check_same_layout(tree, target)
        return tree, int(meta["data_step"])

    def _move_aside(self, step: int) -> None:
        """Process 0 moves it; every process then lists the directory again."""
        if multihost.is_main_process():
            source = os.path.join(self.directory, str(step))
            parent = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
            os.makedirs(parent, exist_ok=True)
            destination = os.path.join(parent, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(source, destination)
            _LOG.warning("Unreadable checkpoint of step %d moved to %s.", step, destination)
        multihost.barrier("checkpoint-moved-aside")
        self._manager.reload()


def _remove_half_written(directory: str) -> None:
    """Deletes `<step>.orbax-checkpoint-tmp*` left by a save that was killed, with a warning."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if ocp.path.atomicity_types.TMP_DIR_SUFFIX in name:
            path = os.path.join(directory, name)
            _LOG.warning(
                "Removing the half-written checkpoint %s (its save was interrupted).", path
            )
            shutil.rmtree(path)


def _state_tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
    """What a checkpoint holds, as host NumPy arrays (the step as int32)."""
    tree = {"params": state.params, "opt_state": state.opt_state, "rng": rng}
    tree = jax.tree.map(np.asarray, jax.device_get(tree))
    tree["step"] = np.asarray(jax.device_get(state.step), np.int32)
    return tree


def _check_same_layout(restored: Any, target: Any) -> None:
    """Raises ValueError if shapes/dtypes differ from `target` or a float value is not finite."""
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(target), strict=True
    ):
        name = jax.tree_util.keystr(path)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{name}: {got.dtype}{list(got.shape)} stored, {want.dtype}{list(want.shape)} "
                "expected"
            )
        if jnp.issubdtype(got.dtype, jnp.inexact) and not np.isfinite(got.astype(np.float32)).all():
            raise ValueError(f"{name} holds non-finite values")


# ----------------------------------------------------------------------------------------------
# The run: setup, resume, loop.


def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    writers: _Writers,
    checkpoints: Checkpoints,
    phase: str = "",
) -> tuple[TrainState, Metrics]:
    resuming = bool(checkpoints.steps())
    if config.pretrained and not resuming:  # before a dataset download, not after
        checkpoint.check_exists(checkpoint.resolve_params_file(config.pretrained))
    info = _dataset_info(config)
    counts = " / ".join(f"{n:,} {split}" for split, n in info.num_examples.items())
    _LOG.info(
        "%s%s: %s examples, %d classes", phase and f"{phase}: ", info.name, counts, info.num_classes
    )
    model = make_model(config, info.num_classes)
    schedule = make_schedule(config)
    state = create_state(config, model, schedule, load_pretrained=not resuming)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    start_step = 0
    if resuming:
        state, rng, start_step = checkpoints.restore_latest(state, rng)
        _LOG.info(
            "Resuming from the checkpoint of step %d in %s.", start_step, checkpoints.directory
        )
    else:
        writers.tensorboard.write_hparams(_flat_hparams(config))
    if start_step > config.total_steps:
        raise ValueError(
            f"{checkpoints.directory} holds a checkpoint of step {start_step}, beyond "
            f"total_steps={config.total_steps}; use a new workdir for a shorter run."
        )

    p_eval_step = make_eval_step(model, config.loss)
    eval_batches = _eval_batches(config)

    def run_eval(params, step: int) -> Metrics:
        metrics = evaluate(p_eval_step, params, eval_batches)
        writers.tensorboard.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        _LOG.info("step %d eval %s", step, _fmt(metrics))
        return metrics

    params_file = os.path.join(workdir, PARAMS_FILE)
    if start_step < config.total_steps:
        state = _train(config, state, rng, start_step, schedule, checkpoints, writers, run_eval)
    else:
        _LOG.info("Already trained to step %d (total_steps); evaluating only.", config.total_steps)
    eval_metrics = run_eval(replicate(state.params), config.total_steps)
    if multihost.is_main_process() and (
        start_step < config.total_steps or not os.path.exists(params_file)
    ):
        checkpoint.save(jax.device_get(state.params), params_file)
    multihost.barrier("params-saved")  # a next phase reads it on every process
    return state, eval_metrics


def _train(
    config: ml_collections.ConfigDict,
    state: TrainState,
    rng: jax.Array,
    start_step: int,
    schedule: optim.Schedule,
    checkpoints: Checkpoints,
    writers: _Writers,
    run_eval: Callable[[Any, int], Metrics],
) -> TrainState:
    """Steps `start_step + 1 … total_steps`; returns the final host state.

    Order at a step boundary: log, checkpoint (after checking every step since the last check
    is finite), stop on a signal, evaluate. With several processes, a signal to any of them
    stops all of them after the same step (`multihost.AgreedStop`, up to 10 steps later).
    """
    p_train_step = make_train_step(config, schedule)
    batches = input_pipeline.prefetch_to_device(_train_batches(config, start_step))
    pstate, prng = replicate(state), replicate(rng)
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.total_steps, writer=writers.tensorboard
    )
    train_metrics = _TrainMetrics(writers.metrics, checkpoints, start_step + 1, config.batch_size)
    try:
        with _StopSignals() as signals:
            agreed_stop = multihost.AgreedStop()
            for step in range(start_step + 1, config.total_steps + 1):
                batch = next(batches)
                with train_metrics.paused(step == start_step + 1):  # compiles the step
                    pstate, metrics = p_train_step(pstate, batch, prng)
                train_metrics.add(metrics)
                progress(step)
                stop_signum = agreed_stop.poll(step, signals.signum)
                last, stopping = step == config.total_steps, stop_signum is not None
                if last or stopping or step % config.log_every == 0:
                    train_metrics.write(step)
                if last or stopping or _every(step, config.checkpoint_every):
                    train_metrics.check_finite()  # every step up to this state
                    with train_metrics.paused():
                        checkpoints.save(
                            step, jax_utils.unreplicate(pstate), jax_utils.unreplicate(prng)
                        )
                if stopping:
                    interrupted = TrainingInterrupted(stop_signum, step, checkpoints.directory)
                    _LOG.warning("%s", interrupted)
                    raise interrupted
                if not last and _every(step, config.eval_every):
                    with train_metrics.paused():
                        run_eval(pstate.params, step)
    finally:
        _close_train_batches(batches)
    return jax.device_get(jax_utils.unreplicate(pstate))


def _close_train_batches(batches) -> None:
    """Stops the device prefetch and releases the tf.data iterator, saying so if it was slow.

    The end-of-phase stall this once showed (tf.data's autotuning thread holding the destructor)
    is gone since training runs with autotune off (`input_pipeline._options`); the log line
    stays so that a slow teardown would be visible.
    """
    start = time.monotonic()
    batches.close()
    seconds = time.monotonic() - start
    if seconds > 1.0:
        _LOG.info("Releasing the training data pipeline took %.1f s (tf.data teardown).", seconds)


class _TrainMetrics:
    """Per-step train metrics: fetched in batches, checked finite, written as window averages.

    `img_per_sec_per_core` counts training time only: the time spent `paused()` (compiling the
    step, saving checkpoints, evaluating) is left out of its window.
    """

    def __init__(
        self,
        writer: metric_writers.MetricWriter,
        checkpoints: Checkpoints,
        first_step: int,
        batch_size: int,
    ):
        self._writer = writer
        self._checkpoints = checkpoints
        self._batch_size = batch_size
        self._pending: list[dict[str, jax.Array]] = []  # on device, not yet checked
        self._next_step = first_step  # the step of _pending[0]
        self._window: list[dict[str, float]] = []  # checked, since the last write
        self._start = time.monotonic()
        self._paused_seconds = 0.0  # since the last write

    @contextlib.contextmanager
    def paused(self, pause: bool = True) -> Iterator[None]:
        """Time inside (when `pause`) is not training time for img/s."""
        if not pause:
            yield
            return
        start = time.monotonic()
        try:
            yield
        finally:
            self._paused_seconds += time.monotonic() - start

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self._pending.append(metrics)

    def check_finite(self) -> None:
        """Fetches the pending steps; FloatingPointError naming the first non-finite one."""
        if not self._pending:
            return
        values = [{k: float(v[0]) for k, v in m.items()} for m in jax.device_get(self._pending)]
        try:
            _check_finite(values, self._next_step)
        except FloatingPointError as e:
            steps = self._checkpoints.steps()
            kept = f"step {steps[-1]}" if steps else "none yet"
            raise FloatingPointError(
                f"{e} No checkpoint was written after it; the latest ({kept}) in "
                f"{self._checkpoints.directory} is intact."
            ) from None
        self._next_step += len(values)
        self._window += values
        self._pending = []

    def write(self, step: int) -> None:
        """Window means of loss and grad norm, the last lr and param norm, img/s per core."""
        self.check_finite()
        seconds = max(time.monotonic() - self._start - self._paused_seconds, 1e-9)
        images = len(self._window) * self._batch_size
        scalars = {
            "train/loss": float(np.mean([m["loss"] for m in self._window])),
            "train/grad_norm": float(np.mean([m["grad_norm"] for m in self._window])),
            "train/lr": self._window[-1]["lr"],
            "train/param_norm": self._window[-1]["param_norm"],
            "train/img_per_sec_per_core": images / seconds / jax.device_count(),
        }
        self._writer.write_scalars(step, scalars)
        self._window, self._start, self._paused_seconds = [], time.monotonic(), 0.0


def _check_finite(values: list[Mapping[str, float]], first_step: int) -> None:
    """Raises FloatingPointError naming the first step whose loss/grad/param norm is not finite."""
    for offset, metrics in enumerate(values):
        for key in _FINITE_METRICS:
            if key in metrics and not np.isfinite(metrics[key]):
                raise FloatingPointError(
                    f"Non-finite training {key} {metrics[key]} at step {first_step + offset}; "
                    "lower base_lr, raise warmup_steps, or check the data."
                )


def _every(step: int, interval: int) -> bool:
    return bool(interval) and step % interval == 0


class _StopSignals:
    """SIGTERM/SIGINT handlers that record the signal (`.signum`); the loop stops at a boundary.

    Installed only in the main thread (Python allows no other); the previous handlers come back
    on exit. A second SIGINT raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# Logs and metric writers.


@contextlib.contextmanager
def _log_to_file(workdir: str) -> Iterator[None]:
    """Copies the run's log lines (Python and absl, INFO and up) to `<workdir>/train.log`.

    The `vit_jax` and `absl` loggers are lowered to INFO for the run if set higher; framework
    INFO chatter is left out of the file (`is_run_record`), the reason a run stopped is kept.
    """
    index = jax.process_index()
    name = LOG_FILE if index == 0 else f"train.process{index}.log"
    handler = logging.FileHandler(os.path.join(workdir, name))
    handler.setLevel(logging.INFO)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s")
    )
    handler.addFilter(_is_file_record)
    loggers = [logging.getLogger(n) for n in ("vit_jax", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# Packages whose INFO lines are the run's own: ours, and clu's metric lines and ETA reports.
_RUN_LOG_SOURCES = (f"{os.sep}vit_jax{os.sep}", f"{os.sep}clu{os.sep}")


def is_run_record(record: logging.LogRecord) -> bool:
    """Whether a log line belongs on the console: warnings and errors, and the run's own lines.

    Framework INFO chatter (orbax's dozens of lines per checkpoint, TensorFlow, JAX) is left
    out; so are records marked `file_only` (the reason a run stopped, which `main` prints as
    its one error line).
    """
    if getattr(record, "file_only", False):
        return False
    return record.levelno >= logging.WARNING or any(
        source in record.pathname for source in _RUN_LOG_SOURCES
    )


def _is_file_record(record: logging.LogRecord) -> bool:
    """What train.log keeps: the console's lines plus the reason the run stopped."""
    return getattr(record, "file_only", False) or is_run_record(record)


class _Writers(NamedTuple):
    """`metrics` goes to TensorBoard and the console; `tensorboard` to TensorBoard only."""

    metrics: metric_writers.MetricWriter  # train scalars
    tensorboard: metric_writers.MetricWriter  # eval (logged as one line), hparams, steps/s


@contextlib.contextmanager
def _metric_writers(workdir: str) -> Iterator[_Writers]:
    """Writers sharing one TensorBoard event file; off process 0, log lines only.

    The hyper-parameter table and clu's steps/s and uptime scalars go to TensorBoard only: the
    console has the config's one-line summary and clu's ETA line instead.
    """
    console = metric_writers.LoggingWriter()
    if jax.process_index() > 0:
        summary = None
        metrics = metric_writers.AsyncMultiWriter([console])
    else:
        summary = metric_writers.SummaryWriter(workdir)
        metrics = metric_writers.AsyncMultiWriter([console, summary])
    tensorboard = metric_writers.MultiWriter([summary] if summary else [])
    try:
        yield _Writers(metrics, tensorboard)
    finally:
        metrics.flush()  # pending asynchronous writes, before the shared file is closed
        metrics.close()


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The config as `{'a.b': value}`; values TensorBoard's hparams cannot hold become strings."""
    flat = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(f"{prefix}{key}.", value)
            return
        scalar = isinstance(node, (bool, int, float, str))
        flat[prefix[:-1]] = node if scalar else str(node)

    visit("", config.to_dict())
    return flat


# ----------------------------------------------------------------------------------------------
# Helpers.


def _source_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Where the dataset is and which share of it this process reads."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "data_dir": config.data_dir or None,
        "manual_dir": config.manual_dir or None,
    }


def _pipeline_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The input-pipeline arguments shared by training and evaluation batches."""
    return {
        "image_size": config.image_size,
        "global_batch_size": config.batch_size,
        "local_device_count": jax.local_device_count(),
        "multi_hot": config.loss == "sigmoid_xent",
        **_source_args(config),
    }


def _dataset_info(config: ml_collections.ConfigDict) -> input_pipeline.DatasetInfo:
    """The dataset's info; a tfds dataset's is read by process 0 before the others.

    A tfds dataset not prepared yet is so downloaded and prepared by one process, not by every
    process at once into the same data_dir. An image folder is validated by all processes
    together (each decodes its share of the files).
    """
    prepare_first = input_pipeline.needs_preparation(config.dataset)
    if prepare_first and not multihost.is_main_process():
        multihost.barrier("dataset-prepared")  # wait for process 0's download and preparation
    info = input_pipeline.get_dataset_info(
        config.dataset,
        train_split=config.train_split,
        test_split=config.test_split,
        **_source_args(config),
    )
    if prepare_first and multihost.is_main_process():
        multihost.barrier("dataset-prepared")
    return info


def _train_batches(config: ml_collections.ConfigDict, start_step: int = 0):
    return input_pipeline.get_train_iterator(
        config.dataset,
        config.train_split,
        seed=config.seed,
        start_step=start_step,
        shuffle_buffer=config.shuffle_buffer,
        **_pipeline_args(config),
    )


def _eval_batches(config: ml_collections.ConfigDict):
    return input_pipeline.get_eval_iterator(
        config.dataset, config.test_split, eval_crop=config.eval_crop, **_pipeline_args(config)
    )


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {key}={value!r}; valid values: {', '.join(valid)}.")


def _check_model_options(config: ml_collections.ConfigDict) -> None:
    _check_choice("compute_dtype", config.compute_dtype, tuple(COMPUTE_DTYPES))
    if config.matmul_dtype:
        _check_choice("matmul_dtype", config.matmul_dtype, tuple(COMPUTE_DTYPES))
    models_vit.validate_options(  # the model's own checks, before any setup work
        classifier=config.model.get("classifier", "token"),
        attention_impl=config.attention_impl,
        remat_policy=config.remat_policy or None,
        batch_chunks=config.batch_chunks,
    )
    vit_only = {k: v for k, v in model_options(config).items() if k != "dtype"}
    if vit_only and models.model_class(config.model.model_name) is not models.VisionTransformer:
        raise ValueError(
            f"{config.model.model_name} takes compute_dtype only; unset {sorted(vit_only)} "
            "(attention_impl, remat_policy, scan_layers, batch_chunks and matmul_dtype are ViT "
            "options)."
        )
    transformer = config.model.get("transformer")
    attention_dropout = (
        models_vit.transformer_option(transformer, "attention_dropout_rate") if transformer else 0
    )
    if config.attention_impl != "flax" and attention_dropout:
        raise ValueError(
            f"attention_impl={config.attention_impl!r} has no attention dropout, but the model's "
            f"transformer.attention_dropout_rate={attention_dropout}; set it to 0 or use "
            "attention_impl='flax'."
        )


def _check_patch_grid(model_config: ml_collections.ConfigDict, image_size: int) -> None:
    """Image size must tile into patches (after the hybrid stem's stride); Mixer has no stem."""
    resnet = model_config.get("resnet")
    models_vit.check_image_size(
        (image_size, image_size),
        tuple(model_config.patches.size),
        models_vit.stem_stride(resnet),
        model_config.model_name,
    )
