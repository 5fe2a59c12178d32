"""Multi-host runs on JAX's multi-controller runtime: start-up, barriers and an agreed stop.

One process per host (or per GPU group) runs the same command; `jax.distributed.initialize`
connects them through a coordinator, after which the pmap'd steps span every device of every
process and their collectives (gradient mean, eval sums) are global. What this module adds is
what the loop needs beyond that:

- `initialize`: the command line's `--coordinator_address/--num_processes/--process_id` (or
  JAX's auto-detection on Cloud TPU pods, SLURM, Open MPI and Kubernetes) → one call to
  `jax.distributed.initialize`, with a heartbeat timeout that bounds how long the others run
  on after a process dies (JAX then aborts them, naming the cause).
- `barrier`: all processes wait at a named point (after process 0 alone wrote a file the others
  read next).
- `AgreedStop`: a signal that reaches one process stops all of them after the same step, so that
  every process takes part in the final checkpoint.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

# Steps between two checks of the agreed stop flag. The flag entered at one check is read at the
# next, so the training loop adds one tiny global collective per _STOP_CHECK_EVERY steps (not per
# step) and the host may run that far ahead of the device; a stop comes at most
# 2 × _STOP_CHECK_EVERY steps after the signal.
STOP_CHECK_EVERY = 5
_LOG = logging.getLogger(__name__)


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = 100,
) -> None:
    """`jax.distributed.initialize`; arguments left None are auto-detected by JAX.

    Must run before anything touches a JAX device. JAX also reads `JAX_COORDINATOR_ADDRESS`
    from the environment. Auto-detection covers Cloud TPU pods, SLURM (`srun`), Open MPI
    (`mpirun`) and Kubernetes; elsewhere all three arguments are needed.
    """
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):  # CPU-only clusters
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    _LOG.info(
        "Process %d of %d: %d local devices of %d.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_main_process() -> bool:
    """Process 0: the one that writes files every process would otherwise write alike."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Returns once every process has reached `barrier(name)` (at once with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class AgreedStop:
    """Turns the local 'a signal arrived' into a step at which every process stops.

    At every step that is a multiple of `STOP_CHECK_EVERY` (the same steps on every process),
    `poll(step, signum)` enters this process's signal number (0 for none) into a global max over
    all devices and returns the max entered at the previous such step: the same value on every
    process at the same step, so all of them stop (and checkpoint) together. With one process
    there is nothing to agree on and the local signal is returned at once.
    """

    def __init__(self):
        self._single = jax.process_count() == 1
        self._pending: jax.Array | None = None  # the max entered at the previous check
        self._global_max = jax.pmap(lambda x: jax.lax.pmax(x, "processes"), "processes")

    def poll(self, step: int, signum: int | None) -> int | None:
        if self._single:
            return signum
        if step % STOP_CHECK_EVERY:
            return None
        previous = self._pending
        local = np.full([jax.local_device_count()], signum or 0, np.int32)
        self._pending = self._global_max(local)
        if previous is None:
            return None
        return int(jax.device_get(previous)[0]) or None
