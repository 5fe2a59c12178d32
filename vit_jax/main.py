"""Command line: `python -m vit_jax.main --workdir=DIR [--config=FILE[:args]] [--config.k=v]`.

Without `--config` it runs the offline main job `configs/default.py` (found as the module
`configs.default`, installed with the package). The config is locked, so an override of a key
the config does not declare fails naming the key. A config with `phases` runs its sub-configs in
order (`train.train_phases`); any other runs `train.train_and_evaluate`.

Multi-host: run the same command once per host with `--distributed` (JAX detects Cloud TPU
pods, SLURM, Open MPI and Kubernetes) or with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`; the workdir must be a directory every process sees.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

from vit_jax import multihost, train


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
            "Only declared keys can be overridden (see configs/common.py).",
        )
        if part
    )


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
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with(_config_file_message(str(e)))
    except (AttributeError, KeyError) as e:  # the locked config rejected an override
        _fail_on_unknown_key(e, argv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    try:
        config = _CONFIG.value
    except OSError as e:  # config_flags defers a missing config file to its first use
        raise app.UsageError(str(e)) from e
    cluster = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(value is not None for value in cluster):
        multihost.initialize(
            coordinator_address=cluster[0],
            num_processes=cluster[1],
            process_id=cluster[2],
            heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
        )
    if "phases" in config:
        results = train.train_phases(config, _WORKDIR.value)
        final = results[config.phases[-1]]
    else:
        _, final = train.train_and_evaluate(config, _WORKDIR.value)
    print(
        f"final test accuracy {final['accuracy']:.4f} (top-5 {final['accuracy_top5']:.4f}, "
        f"loss {final['loss']:.4f}, {int(final['count'])} examples)"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
