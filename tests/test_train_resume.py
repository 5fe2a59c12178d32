"""Checkpoints, resume, interruption, NaN guard and metrics of `train.train_and_evaluate`.

In-process runs use the 8 fake CPU devices of conftest.py. The kill tests run the command line
(`python -m vit_jax.main`, the two-phase run of tests/_two_phase_run.py on 8 fake devices) in
subprocesses, interrupt it for real (SIGTERM, then SIGKILL of the rerun) and compare the params.npz
of the run that finishes with the uninterrupted run's (shared with test_multihost.py) bit for bit.
Adam's state surviving a resume bit for bit is checked in-process, by the corrupted-checkpoint
test's run.
"""

import dataclasses
import glob
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf

from tests import _two_phase_run
from tests._commands import TrainCommand, signal_after
from tests.test_train import tiny_config
from vit_jax import checkpoint, resumable, run_config, train

TINY_STEPS = 4  # in-process run: checkpoints at 2 and 4, eval at 2 and 4
_HPARAMS_TAG = "_hparams_/session_start_info"  # what clu's write_hparams writes


def _same_params(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def _event_tags(workdir) -> dict[str, list[int]]:
    """{tag: [step, ...]} over the TensorBoard event files in `workdir`."""
    tags = {}
    for path in sorted(glob.glob(str(workdir / "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def _steps(workdir) -> list[int]:
    names = os.listdir(os.path.join(workdir, train.CHECKPOINT_DIR))
    return sorted(int(n) for n in names if n.isdigit())


def _small_run_config(**overrides):
    # Adam: its state, restored, must redo steps bit for bit (the corrupted-checkpoint test).
    return tiny_config(
        optimizer="adam",
        base_lr=1e-3,
        total_steps=TINY_STEPS,
        checkpoint_every=2,
        keep_checkpoints=3,
        eval_every=2,
        **overrides,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed in-process run: (workdir, final state, eval metrics)."""
    workdir = tmp_path_factory.mktemp("finished")
    handlers = {s: signal.getsignal(s) for s in train.STOP_SIGNALS}
    state, metrics = train.train_and_evaluate(_small_run_config(), str(workdir))
    assert {s: signal.getsignal(s) for s in train.STOP_SIGNALS} == handlers  # restored
    return workdir, jax.device_get(state), metrics


# ----------------------------------------------------------------------------------------------
# In-process: layout, metrics, rerun, corruption, NaN.


def test_finished_run_leaves_checkpoints_events_and_log(finished_run):
    workdir, state, metrics = finished_run
    assert _steps(workdir) == [2, 4]
    assert not glob.glob(str(workdir / train.CHECKPOINT_DIR / "*tmp*"))  # nothing half-written
    assert _same_params(checkpoint.load(workdir / train.PARAMS_FILE), state.params)
    assert metrics["count"] == 360

    tags = _event_tags(workdir)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/img_per_sec_per_core"):
        assert tags[tag] == [1, 2, 3, 4], tag  # log_every=1
    for tag in ("eval/accuracy", "eval/accuracy_top5", "eval/loss"):
        assert tags[tag] == [2, 4], tag
    assert "steps_per_sec" in tags
    assert len(tags[_HPARAMS_TAG]) == 1

    log = (workdir / train.LOG_FILE).read_text()
    assert re.search(r"step 4 eval accuracy=[\d.]+ accuracy_top5=", log)
    assert "Checkpoint of step 4 saved" in log
    assert log.splitlines()[0].endswith(
        "training testing (width 10, 1 layers, 2 heads, 4×4 px patches) for classification on "
        "sklearn_digits [train] at 8 px, 4 steps of batch 16 on 8 devices, from scratch; "
        "evaluating on [test]"
    )  # what is trained on what comes first; the hyper-parameters are in TensorBoard
    assert "[Hyperparameters]" not in log
    assert "Finished saving checkpoint" not in log  # orbax's INFO chatter is left out


def test_rerun_of_a_finished_run_does_not_train(finished_run, tmp_path, monkeypatch):
    workdir, state, metrics = finished_run
    rerun_dir = tmp_path / "rerun"
    shutil.copytree(workdir, rerun_dir)
    os.remove(rerun_dir / train.PARAMS_FILE)  # killed between the last checkpoint and the npz

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(train, "make_train_step", no_training)
    again_state, again_metrics = train.train_and_evaluate(_small_run_config(), str(rerun_dir))
    assert int(again_state.step) == TINY_STEPS
    assert _same_params(again_state.params, state.params)
    assert _same_params(checkpoint.load(rerun_dir / train.PARAMS_FILE), state.params)
    assert again_metrics == metrics
    assert _steps(rerun_dir) == [2, 4]
    assert "Already trained to step 4" in (rerun_dir / train.LOG_FILE).read_text()


# Orbax's reads of the damaged files still in flight when its restore fails complete on a closed
# asyncio loop; Python reports them as unraisable exceptions. They are harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, caplog):
    workdir, state, _ = finished_run
    resume_dir = tmp_path / "resume"
    shutil.copytree(workdir, resume_dir)
    os.remove(resume_dir / train.PARAMS_FILE)
    checkpoints = resume_dir / train.CHECKPOINT_DIR
    for data_file in glob.glob(str(checkpoints / "4" / "state" / "**" / "d" / "*"), recursive=True):
        with open(data_file, "r+b") as f:  # every array data file of step 4 cut in half
            f.truncate(os.path.getsize(data_file) // 2)
    (checkpoints / "6.orbax-checkpoint-tmp").mkdir()  # a save killed half-way

    with caplog.at_level(logging.INFO, logger="vit_jax.train"):
        resumed, _ = train.train_and_evaluate(_small_run_config(), str(resume_dir))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Checkpoint of step 4" in w and "unreadable" in w for w in warnings)
    assert any("half-written" in w and "6.orbax-checkpoint-tmp" in w for w in warnings)
    assert "Resuming from the checkpoint of step 2" in (resume_dir / train.LOG_FILE).read_text()
    assert _same_params(resumed.params, state.params)  # steps 3-4 redone identically
    assert _steps(resume_dir) == [2, 4]
    assert os.listdir(resume_dir / resumable.UNREADABLE_DIR)[0].startswith("4-")
    tags = _event_tags(resume_dir)
    assert len(tags[_HPARAMS_TAG]) == 1  # written by the first run only
    assert tags["train/loss"] == [1, 2, 3, 4, 3, 4]  # the resumed run logged steps 3 and 4 again


def test_unrestorable_checkpoints_stop_with_a_clear_error(finished_run, tmp_path):
    workdir, _, _ = finished_run
    other_dir = tmp_path / "other"
    shutil.copytree(workdir, other_dir)
    config = _small_run_config()
    config.model.hidden_size = 12  # the saved params do not fit this model
    with pytest.raises(RuntimeError, match=r"No checkpoint in .* can be restored.*step 4.*step 2"):
        train.train_and_evaluate(config, str(other_dir))
    assert _steps(other_dir) == [2, 4]  # nothing moved or deleted


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(
        optimizer="sgd", momentum=0.0, grad_clip_norm=0.0, base_lr=1e5, total_steps=8
    )
    config.update(warmup_steps=1, checkpoint_every=1, keep_checkpoints=2)
    with pytest.raises(FloatingPointError, match=r"loss nan at step 3.*latest \(step 2\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert _steps(tmp_path) == [1, 2]
    restored, _, data_step = _restore_latest(config, tmp_path)
    assert data_step == 2 and int(restored.step) == 2
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored.params))
    assert not (tmp_path / train.PARAMS_FILE).exists()


def test_a_failed_save_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch):
    """Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it only when complete."""
    from orbax.checkpoint._src.path import atomicity

    config = tiny_config()
    state = train.create_state(
        config, run_config.make_model(config, 10), run_config.make_schedule(config)
    )
    rng = jax.random.PRNGKey(0)
    directory = str(tmp_path / train.CHECKPOINT_DIR)
    with resumable.ResumableCheckpoints(directory, keep=2) as checkpoints:
        checkpoints.save(1, state.replace(step=1), rng)

        async def disk_full(*args, **kwargs):  # the data is written, the rename fails
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
        with pytest.raises(OSError, match="No space left"):
            checkpoints.save(2, state.replace(step=2), rng)
        monkeypatch.undo()
    assert sorted(os.listdir(directory)) == ["1", "2.orbax-checkpoint-tmp"]
    with resumable.ResumableCheckpoints(directory, keep=2) as checkpoints:  # removes the leftover
        assert os.listdir(directory) == ["1"]
        restored, _, data_step = checkpoints.restore_latest(state, rng)
    assert data_step == 1 and int(restored.step) == 1
    assert _same_params(restored.params, state.params)


def _restore_latest(config, workdir):
    model = run_config.make_model(config, num_classes=10)
    schedule = run_config.make_schedule(config)
    state = train.create_state(config, model, schedule)
    with resumable.ResumableCheckpoints(
        os.path.join(workdir, train.CHECKPOINT_DIR), 2
    ) as checkpoints:
        return checkpoints.restore_latest(state, jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------------------------
# Subprocesses: real SIGKILL and SIGTERM, then the same command again.


@dataclasses.dataclass
class _Interrupted:
    """The two-phase run of tests/_two_phase_run.py as one process, interrupted twice in its
    pretraining: SIGTERM, the same command again (SIGKILLed), and again to the end."""

    workdir: Path
    sigterm: TrainCommand
    sigterm_returncode: int
    sigterm_log: str  # pretrain/train.log after the SIGTERM
    steps_after_sigterm: list[int]  # the pretraining's checkpoints then
    sigkill: TrainCommand  # the rerun after the SIGTERM
    kill_after: int  # it was SIGKILLed once the checkpoint of this step was complete
    sigkill_returncode: int
    params_after_sigkill: list[str]  # params.npz files there were then
    final: TrainCommand  # the rerun after the SIGKILL
    final_returncode: int


@pytest.fixture(scope="module")
def interrupted(two_phase_reference, tmp_path_factory):
    # The reference first: its programs are then in the compilation cache for these launches.
    two_phase_reference.finished()
    workdir = tmp_path_factory.mktemp("interrupted") / "work"
    checkpoints = workdir / "pretrain" / train.CHECKPOINT_DIR
    commands = {
        name: TrainCommand(
            two_phase_reference.config_file, workdir, devices=_two_phase_run.DEVICES, name=name
        )
        for name in ("sigterm", "sigkill", "final")
    }
    try:
        every = _two_phase_run.CHECKPOINT_EVERY
        sigterm_returncode = signal_after(
            commands["sigterm"], checkpoints / str(every), signal.SIGTERM
        )
        sigterm_log = (workdir / "pretrain" / train.LOG_FILE).read_text()
        steps_after_sigterm = _steps(workdir / "pretrain")
        match = re.search(r"Training stopped by SIGTERM after step (\d+)", sigterm_log)
        assert match, commands["sigterm"].tail()
        kill_after = (int(match.group(1)) // every + 1) * every
        sigkill_returncode = signal_after(
            commands["sigkill"], checkpoints / str(kill_after), signal.SIGKILL
        )
        params = [workdir / phase / train.PARAMS_FILE for phase in ("pretrain", "finetune")]
        params_after_sigkill = [str(p) for p in params if p.exists()]
        yield _Interrupted(
            workdir=workdir,
            sigterm=commands["sigterm"],
            sigterm_returncode=sigterm_returncode,
            sigterm_log=sigterm_log,
            steps_after_sigterm=steps_after_sigterm,
            sigkill=commands["sigkill"],
            kill_after=kill_after,
            sigkill_returncode=sigkill_returncode,
            params_after_sigkill=params_after_sigkill,
            final=commands["final"],
            final_returncode=commands["final"].run(),
        )
    finally:
        for command in commands.values():
            command.kill()


def _same_as_the_reference(workdir: Path, reference: TrainCommand) -> None:
    for phase in ("pretrain", "finetune"):
        got = checkpoint.load(workdir / phase / train.PARAMS_FILE)
        want = checkpoint.load(reference.workdir / phase / train.PARAMS_FILE)
        assert _same_params(got, want), phase


def test_sigkill_then_rerun_matches_an_uninterrupted_run(interrupted, two_phase_reference):
    run = interrupted
    assert run.sigkill_returncode == -signal.SIGKILL, run.sigkill.tail()
    assert run.params_after_sigkill == []  # killed in the pretraining, before its params.npz
    assert run.final_returncode == 0, run.final.tail()
    log = run.final.stderr.read_text()
    resumed_from = re.search(r"Resuming from the checkpoint of step (\d+)", log)
    assert resumed_from, log[-3000:]
    assert run.kill_after <= int(resumed_from.group(1)) < _two_phase_run.PRETRAIN_STEPS
    reference = two_phase_reference.finished()
    assert "final test accuracy" in reference.stdout.read_text()
    _same_as_the_reference(run.workdir, reference)


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_from_it(interrupted, two_phase_reference):
    run = interrupted
    assert run.sigterm_returncode == 128 + signal.SIGTERM, run.sigterm.tail()
    assert "final test accuracy" not in run.sigterm.stdout.read_text()
    match = re.search(
        r"Training stopped by SIGTERM after step (\d+); its checkpoint is in", run.sigterm_log
    )
    assert match, run.sigterm_log[-3000:]
    step = int(match.group(1))
    assert _two_phase_run.CHECKPOINT_EVERY < step < _two_phase_run.PRETRAIN_STEPS
    assert run.steps_after_sigterm[-1] == step

    # The rerun resumed from it (and was SIGKILLed later; the run after that ends with the
    # uninterrupted run's params bit for bit).
    assert f"Resuming from the checkpoint of step {step} " in run.sigkill.stderr.read_text()
    assert run.final_returncode == 0, run.final.tail()
    _same_as_the_reference(run.workdir, two_phase_reference.finished())
