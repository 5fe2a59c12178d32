"""The training loop: `train_and_evaluate(config, workdir)` and multi-phase `train_phases`.

The loop is the same for every objective: the task (`vit_jax.tasks`, chosen by `config.task`)
owns targets, head, loss and metrics; `vit_jax.steps` holds the pmap'd steps; `run_config`
checks the config and builds the model and optimizer from it, `run_data` the data; `resumable`
the workdir's checkpoints; `run_log` the log lines and TensorBoard scalars.

What a run leaves in its workdir:
- `checkpoints/<step>/`: resumable state (params, optimizer state, step, rng, data position);
  a run restarted with the same workdir resumes from the latest readable one.
- TensorBoard event files (train loss, lr, grad/param norm, img/s/core, steps/s, the task's eval
  metrics, the hyper-parameters once) and `train.log` (the run's log lines).
- `params.npz`: the final params in the released format, and `task.json`: what `predict` needs
  to read the model's outputs (class names; a regression's target names and units).
- with `keep_best`: `best_params.npz` and `best.json`, the best evaluation by the task's metric.

Several processes (hosts) run the same loop on their own devices and data (`multihost`): the
steps' collectives are global, and files every process would write alike are written by
process 0 (orbax coordinates the checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import periodic_actions
from flax import jax_utils

from vit_jax import (
    checkpoint,
    encoder_tree,
    input_pipeline,
    multihost,
    resumable,
    run_config,
    run_data,
    run_log,
    tasks,
    weights_info,
)
from vit_jax.steps import TrainState, evaluate, make_eval_step, make_train_step, replicate
from vit_jax.tasks import Metrics

PICTURE_IMAGES = 4  # evaluation images in a task's picture (MAE's reconstructions)
PARAMS_FILE = checkpoint.PARAMS_FILE
CHECKPOINT_DIR = resumable.CHECKPOINT_DIR
LOG_FILE = run_log.LOG_FILE
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_LOG = logging.getLogger(__name__)


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
    the loss is not finite (no checkpoint holds non-finite values). The config checks
    (`run_config.check_before_start`) come first and raise before `train.log` is opened; any
    later error that stops the run is also written there. `phase` names the run in its first
    log line.
    """
    run_config.check_before_start(config, workdir)  # before a dataset download; makes workdir
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_log.log_to_file(workdir))
        _LOG.info("%s", run_config.describe_run(config, phase))
        try:
            writers = stack.enter_context(run_log.metric_writers_for(workdir))
            checkpoints = stack.enter_context(
                resumable.ResumableCheckpoints(
                    os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints
                )
            )
            run = _setup(config, workdir, writers, checkpoints, phase)
            state = run.state
            if run.start_step < config.total_steps:
                state = _train(config, run, checkpoints, writers)
            else:
                _LOG.info("Already trained to step %d; evaluating only.", config.total_steps)
            final_params = replicate(state.params)
            final = run.evaluate(final_params, config.total_steps)
            run.fewshot(final_params, config.total_steps)
            params_file = os.path.join(workdir, PARAMS_FILE)
            if multihost.is_main_process() and (
                run.start_step < config.total_steps or not os.path.exists(params_file)
            ):
                checkpoint.save(jax.device_get(state.params), params_file)
                _record_input_norm(config, params_file)
                _export_encoder(config, state.params, workdir)
            multihost.barrier("params-saved")  # a next phase reads it on every process
            return state, final
        except Exception as e:
            _LOG.error("The run stopped: %s: %s", type(e).__name__, e, extra={"file_only": True})
            raise


def train_phases(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Metrics]:
    """Runs each of `config.phases` (a sub-config each) in `<workdir>/<phase>`, in order.

    A phase whose `pretrained` is `'phase:<name>'` starts from that earlier phase's params.
    Every phase's config is checked before the first one starts. Returns the final eval
    metrics per phase. Completed phases are not trained again.
    """
    phases = run_config.resolve_phases(config, workdir)
    run_config.make_workdir(workdir)
    results = {}
    for name, phase in phases.items():
        _, results[name] = train_and_evaluate(phase, os.path.join(workdir, name), phase=name)
    return results


def _record_input_norm(config: ml_collections.ConfigDict, params_file: str) -> None:
    """A model fed other than the original's [-1, 1] pixels says so beside its params."""
    input_norm = config.model.get("input_norm", weights_info.DEFAULT_INPUT_NORM)
    if input_norm != weights_info.DEFAULT_INPUT_NORM:
        weights_info.write(params_file, input_norm=input_norm, model=config.model.model_name)


def _export_encoder(config: ml_collections.ConfigDict, params: Any, workdir: str) -> None:
    """A pretraining run's encoder alone, as a released-format ViT file (`encoder.npz`)."""
    encoder, left_out = encoder_tree.encoder_params(jax.device_get(params))
    if not left_out:
        return
    path = os.path.join(workdir, encoder_tree.ENCODER_FILE)
    checkpoint.save(encoder, path)
    _record_input_norm(config, path)
    _LOG.info("Encoder exported to %s (without %s).", path, "; ".join(left_out))


def create_state(
    config: ml_collections.ConfigDict,
    model,
    schedule,
    *,
    load_pretrained: bool = True,
    num_features: int = 0,
) -> TrainState:
    """Fresh (or `config.pretrained`) params and optimizer state, on the host.

    `load_pretrained=False` skips reading `config.pretrained` (a resumed run overwrites them).
    `num_features`: the width of the per-image features the head also reads (0 = none).
    """
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    features = {}
    if num_features:
        features = {"features": jnp.zeros((1, num_features), jnp.float32)}
    init = jax.jit(lambda rng: model.init(rng, dummy, train=False, **features)["params"])
    params = init(jax.random.PRNGKey(config.seed))
    if config.pretrained and load_pretrained:
        pretrained = checkpoint.resolve_params_file(config.pretrained)
        weights_info.check_input_norm(
            pretrained,
            config.model.get("input_norm", weights_info.DEFAULT_INPUT_NORM),
            f"config.model ({config.model.model_name})",
        )
        params = checkpoint.load_pretrained(
            pretrained_path=pretrained,
            init_params=jax.device_get(params),
            model_config=config.model,
        )
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=run_config.make_optimizer(config, schedule)
    )


# ----------------------------------------------------------------------------------------------
# The run: setup, loop.


class _Run(NamedTuple):
    """What `_setup` built: the task, the start state and the evaluation of a params tree."""

    task: tasks.Task
    state: TrainState  # on the host
    rng: Any
    start_step: int
    schedule: Any
    evaluate: Callable[[Any, int], Metrics]  # (replicated params, step) → metrics, logged
    fewshot: Callable[[Any, int], None]  # (replicated params, step): few-shot accuracies logged


def _setup(
    config: ml_collections.ConfigDict,
    workdir: str,
    writers: run_log.Writers,
    checkpoints: resumable.ResumableCheckpoints,
    phase: str,
) -> _Run:
    """Dataset info, task, model, state (fresh, pretrained or restored) and the evaluator."""
    resuming = bool(checkpoints.steps())
    info = run_data.dataset_info(config)
    counts = " / ".join(f"{n:,} {split}" for split, n in info.num_examples.items())
    outputs = (
        f"{info.num_classes} classes"
        if not info.target_names
        else (f"targets {', '.join(info.target_names)}")
    )
    _LOG.info("%s%s: %s examples, %s", phase and f"{phase}: ", info.name, counts, outputs)
    task = tasks.make_task(config, info)
    model = task.wrap_model(run_config.make_model(config, **task.head()))
    schedule = run_config.make_schedule(config)
    state = create_state(
        config, model, schedule, load_pretrained=not resuming, num_features=info.num_features
    )
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    start_step = 0
    if resuming:
        state, rng, start_step = checkpoints.restore_latest(state, rng)
        _LOG.info(
            "Resuming from the checkpoint of step %d in %s.", start_step, checkpoints.directory
        )
    else:
        writers.tensorboard.write_hparams(run_log.flat_hparams(config))
    if start_step > config.total_steps:
        raise ValueError(
            f"{checkpoints.directory} holds a checkpoint of step {start_step}, beyond "
            f"total_steps={config.total_steps}; use a new workdir for a shorter run."
        )
    if multihost.is_main_process():
        # The resolution too: predict's default for a file that does not record it (Swin).
        info = {**task.inference_info(), "image_size": config.image_size}
        with open(os.path.join(workdir, tasks.INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)

    p_eval_step = make_eval_step(model, task)
    eval_batches = run_data.eval_batches(config, task)
    best = resumable.BestParams(workdir, task.is_better, start_step) if config.keep_best else None

    picture = jax.jit(functools.partial(task.picture, model.apply))
    picture_images = None

    def run_eval(params, step: int) -> Metrics:
        nonlocal picture_images
        metrics = evaluate(p_eval_step, params, eval_batches, task)
        writers.tensorboard.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        _LOG.info("step %d eval %s", step, run_log.fmt(metrics))
        if multihost.is_main_process() and type(task).picture is not tasks.Task.picture:
            if picture_images is None:  # the first images of the first evaluation batch
                picture_images = next(iter(eval_batches))["image"][0][:PICTURE_IMAGES]
            one_copy = jax_utils.unreplicate(params)
            image = np.asarray(picture(one_copy, picture_images))
            run_log.write_picture(writers, workdir, step, image)
        if best is not None:
            best.update(step, metrics, params)
        return metrics

    fewshot_evaluator = run_data.fewshot_evaluator(config)

    def run_fewshot(params, step: int) -> None:
        if fewshot_evaluator is None:
            return
        results = fewshot_evaluator(params)
        writers.tensorboard.write_scalars(step, {f"fewshot/{k}": v for k, v in results.items()})
        shown = {k: v for k, v in results.items() if not k.endswith("_std")}
        _LOG.info("step %d few-shot %s", step, run_log.fmt(shown))

    return _Run(task, state, rng, start_step, schedule, run_eval, run_fewshot)


def _train(
    config: ml_collections.ConfigDict,
    run: _Run,
    checkpoints: resumable.ResumableCheckpoints,
    writers: run_log.Writers,
) -> TrainState:
    """Steps `start_step + 1 … total_steps`; returns the final host state.

    Order at a step boundary: log, checkpoint (after checking every step since the last check
    is finite), stop on a signal, evaluate. With several processes, a signal to any of them
    stops all of them after the same step (`multihost.AgreedStop`, up to 10 steps later).
    """
    p_train_step = make_train_step(run.task, run.schedule, config.accum_steps)
    batches = input_pipeline.prefetch_to_device(
        run_data.train_batches(config, run.task, run.start_step)
    )
    pstate, prng = replicate(run.state), replicate(run.rng)
    inputs = run.task.step_inputs()
    pinputs = None if inputs is None else replicate(inputs)
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.total_steps, writer=writers.tensorboard
    )
    start = run.start_step
    metrics_log = run_log.TrainMetrics(writers.metrics, checkpoints, start + 1, config.batch_size)
    try:
        with _StopSignals() as signals:
            agreed_stop = multihost.AgreedStop()
            for step in range(start + 1, config.total_steps + 1):
                batch = next(batches)
                with metrics_log.paused(step == start + 1):  # compiles the step
                    pstate, metrics = p_train_step(pstate, batch, prng, pinputs)
                metrics_log.add(metrics)
                progress(step)
                stop_signum = agreed_stop.poll(step, signals.signum)
                last, stopping = step == config.total_steps, stop_signum is not None
                if last or stopping or step % config.log_every == 0:
                    metrics_log.write(step)
                if last or stopping or _every(step, config.checkpoint_every):
                    metrics_log.check_finite()  # every step up to this state
                    with metrics_log.paused():
                        checkpoints.save(
                            step, jax_utils.unreplicate(pstate), jax_utils.unreplicate(prng)
                        )
                if stopping:
                    interrupted = TrainingInterrupted(stop_signum, step, checkpoints.directory)
                    _LOG.warning("%s", interrupted)
                    raise interrupted
                if not last and _every(step, config.eval_every):
                    with metrics_log.paused():
                        run.evaluate(pstate.params, step)
                if not last and _every(step, config.fewshot.every):
                    with metrics_log.paused():
                        run.fewshot(pstate.params, step)
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
