"""The pmap'd train and eval steps: pure functions of (state, batch, rng), the task pluggable.

`train_step` averages the task's micro-batch gradients, takes their mean over the 'batch'
devices and applies the optax update; `eval_step` sums the task's per-example values over the
real (unpadded) examples of every device. The task supplies the loss and the values
(`vit_jax.tasks`), so these steps are the same for every objective.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import optim
from vit_jax.tasks import Metrics, Task

TrainState = train_state.TrainState


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    inputs: Any = None,
    *,
    task: Task,
    schedule: optim.Schedule,
    accum_steps: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on this device's batch: averaged micro-batch grads, mean over 'batch' devices.

    The key of micro-batch i differs per step, device and i (`fold_in`s of `rng`); the task
    draws its dropout (and e.g. mixup) randomness from it. `inputs` are the task's
    `step_inputs()` (e.g. a teacher's params), replicated. Metrics are identical on all devices.
    """
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index("batch"))

    def micro_grads(params, micro_batch, key):
        def loss(p):
            return task.train_loss(state.apply_fn, p, micro_batch, key, inputs)

        return jax.value_and_grad(loss)(params)

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

    Micro-batch i gets the key fold_in(rng, i). With equal micro-batches the mean of the
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


def eval_step(
    params: Any, batch: Mapping[str, jax.Array], *, apply_fn, task: Task
) -> dict[str, jax.Array]:
    """The task's per-example values and the example count, summed over real examples and
    all devices."""
    mask = batch["mask"]
    values = task.eval_values(apply_fn, params, batch)
    sums = {key: jnp.sum(value * mask) for key, value in values.items()}
    sums["count"] = jnp.sum(mask)
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


def make_train_step(task: Task, schedule: optim.Schedule, accum_steps: int):
    """`train_step` pmap'd over local devices (axis 'batch'), the state buffers donated."""
    step = functools.partial(train_step, task=task, schedule=schedule, accum_steps=accum_steps)
    return jax.pmap(step, axis_name="batch", donate_argnums=(0,))


def make_eval_step(model, task: Task):
    step = functools.partial(eval_step, apply_fn=model.apply, task=task)
    return jax.pmap(step, axis_name="batch")


def evaluate(p_eval_step, params, batches: Iterable, task: Task) -> Metrics:
    """The task's metrics over one pass of `batches` (every example counted once)."""
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(jax_utils.unreplicate(p_eval_step(params, batch)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return task.metrics(totals)
