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

# How many steps late each process reads the agreed stop flag: the flag of step s is read after
# step s + _STOP_LAG has been dispatched, when its (tiny) collective has long finished, so the
# check never waits on the device.
_STOP_LAG = 2
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

    Each step, `poll(signum)` enters this process's signal number (0 for none) into a global
    max over all devices and returns the max entered `_STOP_LAG` steps earlier: the same value
    on every process at the same step, so all of them stop (and checkpoint) together. With one
    process there is nothing to agree on and the local signal is returned at once.
    """

    def __init__(self):
        self._single = jax.process_count() == 1
        self._pending: list[jax.Array] = []
        self._global_max = jax.pmap(lambda x: jax.lax.pmax(x, "processes"), "processes")

    def poll(self, signum: int | None) -> int | None:
        if self._single:
            return signum
        local = np.full([jax.local_device_count()], signum or 0, np.int32)
        self._pending.append(self._global_max(local))
        if len(self._pending) <= _STOP_LAG:
            return None
        agreed = int(jax.device_get(self._pending.pop(0))[0])
        return agreed or None
