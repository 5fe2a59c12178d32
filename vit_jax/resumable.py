"""A run's resumable state in its workdir: orbax checkpoints of the train state, best params.

Not the released-checkpoint format: that is `vit_jax.checkpoint` (`.npz` files of params only,
readable by the original vit_jax and timm). Here a checkpoint is everything a killed run needs
to continue bit-identically: params, optimizer state, step, rng and the data position.

- `ResumableCheckpoints`: `<workdir>/checkpoints/<step>/`, written by orbax into a temporary
  directory renamed when complete; the last `keep` are kept; an unreadable one is moved to
  `checkpoints_unreadable/` and the previous one used.
- `BestParams`: with `keep_best`, the params of the best evaluation so far by the task's
  validation metric (`best_params.npz`, released format) and that result (`best.json`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.training import train_state

from vit_jax import checkpoint, multihost

CHECKPOINT_DIR = "checkpoints"  # resumable checkpoints, one sub-directory per step
UNREADABLE_DIR = "checkpoints_unreadable"  # where unreadable checkpoints are moved aside
BEST_PARAMS_FILE = "best_params.npz"
BEST_RESULT_FILE = "best.json"
_LOG = logging.getLogger(__name__)

TrainState = train_state.TrainState


class ResumableCheckpoints:
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

    def __enter__(self) -> ResumableCheckpoints:
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


def has_checkpoints(directory: str) -> bool:
    """Whether `directory` holds a completed checkpoint (a `<step>` folder), i.e. a run there
    resumes. Read from the folder names, without opening orbax's manager (which creates the
    folder): the config checks ask before a run starts, and a run that failed before its first
    save leaves the folder empty."""
    return os.path.isdir(directory) and any(
        name.isdigit() and os.path.isdir(os.path.join(directory, name))
        for name in os.listdir(directory)
    )


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


class BestParams:
    """The best evaluation so far (by the task's `is_better`) and its params, in the workdir.

    `best.json` holds the step and metrics of the params in `best_params.npz`. A resumed run
    (`start_step` > 0) reads it back, so the best is kept across restarts; a run from step 0
    ignores (and overwrites) what an earlier run in the same workdir left. Process 0 writes
    both files (the params first, so `best.json` never names params that are not on disk).
    """

    def __init__(self, workdir: str, is_better, start_step: int = 0):
        self.params_file = os.path.join(workdir, BEST_PARAMS_FILE)
        self._result_file = os.path.join(workdir, BEST_RESULT_FILE)
        self._is_better = is_better
        self.result: dict[str, Any] | None = None
        if start_step and os.path.exists(self._result_file) and os.path.exists(self.params_file):
            with open(self._result_file) as f:
                result = json.load(f)
            # Kept only if the resumed run had reached it: a later one was judged by steps the
            # resumed run replays (deterministically) and judges again.
            if result["step"] <= start_step:
                self.result = result

    def update(self, step: int, metrics: Mapping[str, float], params: Any) -> bool:
        """Keeps `params` if `metrics` beat the best so far; returns whether they did.

        `params` may be replicated on the local devices (their first copy is written).
        """
        old = self.result["metrics"] if self.result else None
        if old is not None and self.result["step"] >= step:
            return False  # a resumed run re-evaluating a step it already judged
        if not self._is_better(metrics, old):
            return False
        self.result = {"step": step, "metrics": dict(metrics)}
        if multihost.is_main_process():
            host = jax.device_get(jax.tree.map(lambda x: x[0], params))
            checkpoint.save(host, self.params_file)
            with open(self._result_file, "w") as f:
                json.dump(self.result, f, indent=1)
        _LOG.info(
            "step %d is the best evaluation so far; its params are in %s", step, self.params_file
        )
        return True
