"""Trains a ViT or MLP-Mixer and writes its params in the released format.

    python -m vit_jax.main --workdir=DIR [--config=FILE[:ARGS]] [--config.KEY=VALUE ...]

Configs (--config):
  (none)                               the offline main job, configs/default.py: pretrain a
                                       small ViT on the embedded digits, then fine-tune it
  configs/finetune.py:MODEL,DATASET    fine-tuning recipe, e.g. ViT-B_16,cifar10; datasets:
                                       cifar10, cifar100, imagenet2012, oxford_iiit_pet,
                                       oxford_flowers102, folder:/path/to/images
  configs/pretrain.py:MODEL            ImageNet-21k pretraining recipe, e.g. ViT-B_16
  configs/regression.py:MODEL,CSV      regression fine-tuning (Kaggle Pawpularity layout), e.g.
                                       ViT-B_16,/data/petfinder/train.csv; --config.csv.fold=I
  configs/deit.py:MODEL[,DATASET]      DeiT's ImageNet-1k recipe, e.g. DeiT-S_16; a -dist model
                                       distils from --config.distill.teacher_model/_checkpoint
  configs/pretrain_mae.py:MODEL[,DATASET]  MAE self-supervised pretraining (no labels read)
  configs/pretrain_mpp.py:MODEL[,DATASET]  the ViT paper's masked patch prediction
  configs/finetune_mae.py:MODEL[,DATASET]  MAE's fine-tuning (gap, layer-wise lr decay)
Overrides: --config.KEY=VALUE after --config, e.g. --config.pretrained=ViT-B_16.npz,
  --config.batch_size=256, --config.model.transformer.dropout_rate=0.1. Every key is declared,
  with its default and a one-line comment, in configs/common.py; an undeclared key is an error.
  The default job has two phases: their keys are --config.pretrain.KEY and --config.finetune.KEY.
Outputs in --workdir: params.npz (released format), task.json (for predict), checkpoints/
  (rerun the same command to resume), train.log and TensorBoard event files; with
  --config.keep_best=True also best_params.npz; a self-supervised run also encoder.npz (the
  encoder alone, released format) and, for MAE, pictures/<step>.png. --verbose shows framework
  log lines and tracebacks.
Multi-host: the same command once per host with --distributed (Cloud TPU pods, SLURM, Open MPI,
  Kubernetes are detected) or --coordinator_address=HOST:PORT --num_processes=N
  --process_id=I; the workdir must be a directory every process sees.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vit_jax import native_notices

_HIDE_NATIVE_STDERR = not native_notices.verbose_requested()


def default_config_path() -> str:
    """The file of the module `configs.default` (the repo's, or the installed copy)."""
    spec = importlib.util.find_spec("configs.default")
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "The default config module `configs.default` is not importable; reinstall vit_jax "
            "(`pip install .` ships `configs/`) or pass --config=path/to/config.py."
        )
    return spec.origin


def _unknown_key_message(error: Exception, argv: list[str]) -> str | None:
    """One line naming the `--config.<key>` override a locked config rejected, or None."""
    while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(...))
        error = error.args[0]
    text = str(error.args[0]) if error.args else ""
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    names = [a.split("=", 1)[0].lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
    named = [n for n in names if key in n.split(".")[1:]]
    if not key or not named:
        return None
    return " ".join(
        part
        for part in (
            f"Unknown config key --{named[0]}: the config declares no {key!r}.",
            hint,
            _phase_hint(named[0].removeprefix("config."), argv),
            "Only declared keys can be overridden (see configs/common.py).",
        )
        if part
    )


def _phase_hint(dotted_key: str, argv: list[str]) -> str:
    """For a config with phases: 'Write --config.<phase>.<key>' naming the phases that have it."""
    try:
        config = _load_config(argv)
    except Exception:  # the hint is optional; the unknown-key message stands without it
        return ""
    if "phases" not in config:
        return ""
    first = dotted_key.split(".")[0]
    having = [p for p in config.phases if first in config[p]]
    if not having:
        return ""
    written = " or ".join(f"--config.{p}.{dotted_key}" for p in having)
    return f"This config runs phases {tuple(config.phases)}: write {written}."


def _load_config(argv: list[str]):
    """The config named by argv's --config (or the default), without its overrides."""
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    path, _, arg = (value or default_config_path()).partition(":")
    spec = importlib.util.spec_from_file_location("_vit_jax_run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _config_file_message(message: str) -> str:
    """`flag --config=F: Error whilst parsing config file: <traceback>` → the flag and the error."""
    head, sep, _ = message.partition(": Error whilst parsing config file")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{head}: {lines[-1]}" if sep and lines else message


def _exit_with(message: str) -> NoReturn:
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def _fail_on_unknown_key(error: Exception, argv: list[str]) -> NoReturn:
    message = _unknown_key_message(error, argv)
    if message is None:
        raise error
    _exit_with(message)


_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for params.npz and run outputs.")
try:  # without --config, the default config and its overrides are parsed right here
    _CONFIG = config_flags.DEFINE_config_file(
        "config", default_config_path(), "Run config file (and ':args').", lock_config=True
    )
except (AttributeError, KeyError) as e:
    _fail_on_unknown_key(e, sys.argv)
flags.mark_flag_as_required("workdir")
_VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "Show framework log lines (orbax, TensorFlow, JAX) on the console and the traceback of an "
    "error; by default the console shows the run's own lines and errors as one message.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Start JAX's multi-process runtime, detecting the cluster (Cloud TPU pod, SLURM, Open MPI, "
    "Kubernetes). Implied by --coordinator_address/--num_processes/--process_id.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, reachable from every process."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 … N-1.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    100,
    "When a process stops answering for this long, the others abort (multi-process runs).",
)
# The multi-host flags (tests/test_readme.py parses the README's commands with them).
HOST_FLAGS = (
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "heartbeat_timeout_seconds",
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config errors as one line instead of a traceback."""
    try:
        with native_notices.stderr_hidden(_HIDE_NATIVE_STDERR):  # a recipe may import TensorFlow
            return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with(_config_file_message(str(e)))
    except (AttributeError, KeyError) as e:  # the locked config rejected an override
        _fail_on_unknown_key(e, argv)


class _ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS message` (warnings and errors prefixed with their level): a console to read."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            time_text, _, message = text.partition(" ")
            return f"{time_text} {record.levelname}: {message}"
        return text


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    # Imported here, not at the top, as the loop is in _train: flag errors and --helpshort need
    # not wait for jax. These import no TensorFlow (which takes seconds), so a config error is
    # reported before it loads.
    from vit_jax import run_config, run_log, tasks

    if not _VERBOSE.value:
        console = absl_logging.get_absl_handler()
        console.addFilter(run_log.is_run_record)
        console.setFormatter(_ConsoleFormatter())
    try:
        config = _CONFIG.value
    except OSError as e:  # config_flags defers a missing config file to its first use
        raise app.UsageError(str(e)) from e
    try:
        _start_runtime()
        run_config.check_before_start(config, _WORKDIR.value)
        final, last = _train(config)
    except Exception as e:  # one message, not a traceback; train.log has the same line
        if _VERBOSE.value:
            raise
        sys.stderr.write(f"Error: {e}\n(--verbose shows the traceback)\n")
        sys.exit(1)
    print(tasks.task_class(last).summary(last, final))


def _start_runtime() -> None:
    """JAX's multi-process runtime, when the flags ask for it (before any JAX computation)."""
    from vit_jax import multihost

    cluster = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(value is not None for value in cluster):
        multihost.initialize(
            coordinator_address=cluster[0],
            num_processes=cluster[1],
            process_id=cluster[2],
            heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
        )


def _train(config) -> tuple[dict[str, float], Any]:
    """Runs the config; returns the last phase's final metrics and its config."""
    with native_notices.stderr_hidden(not _VERBOSE.value):  # TensorFlow's notices at import
        from vit_jax import train

    if "phases" in config:
        last = config.phases[-1]
        return train.train_phases(config, _WORKDIR.value)[last], config[last]
    return train.train_and_evaluate(config, _WORKDIR.value)[1], config


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
