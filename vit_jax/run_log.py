"""What a run writes besides checkpoints: its log lines, train.log, TensorBoard scalars.

- `log_to_file`: the run's own log lines (and the reason it stopped) copied to
  `<workdir>/train.log`; `is_run_record` is the console filter `main` installs, so the console
  shows the run's lines and not framework chatter (orbax, TensorFlow, JAX INFO lines).
- `metric_writers`: one TensorBoard event file; train scalars also on the console, eval
  scalars, hparams and steps/s on TensorBoard only (the loop logs its own one-line eval result).
- `TrainMetrics`: per-step train metrics fetched in batches, checked finite (FloatingPointError
  naming the first bad step), written as window means with img/s per core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import ml_collections
import numpy as np

from vit_jax.resumable import ResumableCheckpoints

if TYPE_CHECKING:  # imported on use: clu's writers import TensorFlow (see metric_writers_for)
    from clu import metric_writers

LOG_FILE = "train.log"
FINITE_METRICS = ("loss", "grad_norm", "param_norm")  # all finite ⇒ the new state is finite


@contextlib.contextmanager
def log_to_file(workdir: str) -> Iterator[None]:
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


class Writers(NamedTuple):
    """`metrics` goes to TensorBoard and the console; `tensorboard` to TensorBoard only."""

    metrics: metric_writers.MetricWriter  # train scalars
    tensorboard: metric_writers.MetricWriter  # eval (logged as one line), hparams, steps/s


@contextlib.contextmanager
def metric_writers_for(workdir: str) -> Iterator[Writers]:
    """Writers sharing one TensorBoard event file; off process 0, log lines only.

    The hyper-parameter table and clu's steps/s and uptime scalars go to TensorBoard only: the
    console has the config's one-line summary and clu's ETA line instead.
    """
    # Here, not at the top: clu's writers import TensorFlow, and `main` installs the console
    # filter (`is_run_record`) and checks the config before that import.
    from clu import metric_writers

    console = metric_writers.LoggingWriter()
    if jax.process_index() > 0:
        summary = None
        metrics = metric_writers.AsyncMultiWriter([console])
    else:
        summary = metric_writers.SummaryWriter(workdir)
        metrics = metric_writers.AsyncMultiWriter([console, summary])
    tensorboard = metric_writers.MultiWriter([summary] if summary else [])
    try:
        yield Writers(metrics, tensorboard)
    finally:
        metrics.flush()  # pending asynchronous writes, before the shared file is closed
        metrics.close()


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
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


class TrainMetrics:
    """Per-step train metrics: fetched in batches, checked finite, written as window averages.

    `img_per_sec_per_core` counts training time only: the time spent `paused()` (compiling the
    step, saving checkpoints, evaluating) is left out of its window.
    """

    def __init__(
        self,
        writer: metric_writers.MetricWriter,
        checkpoints: ResumableCheckpoints,
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
            check_finite(values, self._next_step)
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


def check_finite(values: list[Mapping[str, float]], first_step: int) -> None:
    """Raises FloatingPointError naming the first step whose loss/grad/param norm is not finite."""
    for offset, metrics in enumerate(values):
        for key in FINITE_METRICS:
            if key in metrics and not np.isfinite(metrics[key]):
                raise FloatingPointError(
                    f"Non-finite training {key} {metrics[key]} at step {first_step + offset}; "
                    "lower base_lr, raise warmup_steps, or check the data."
                )


PICTURES_DIR = "pictures"  # <workdir>/pictures/<step>.png: the task's picture at each evaluation


def write_picture(writers: Writers, workdir: str, step: int, picture: np.ndarray) -> str:
    """The task's picture as `<workdir>/pictures/<step>.png` and a TensorBoard image."""
    from PIL import Image

    directory = os.path.join(workdir, PICTURES_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{step}.png")
    Image.fromarray(np.asarray(picture, np.uint8)).save(path)
    writers.tensorboard.write_images(step, {"eval/picture": np.asarray(picture)[None]})
    return path


def fmt(metrics: Mapping[str, float]) -> str:
    """`k=v` pairs, 4 significant digits: the console's eval line."""
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
