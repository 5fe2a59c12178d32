"""Multi-process training: 2 local processes × 4 fake CPU devices against 1 process × 8.

The processes run `python -m vit_jax.main` with `--coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=I` (JAX's multi-controller runtime, gloo collectives on CPU).
The run is a two-phase pretrain (8 px) → fine-tune (16 px) on the embedded digits, with dropout
and mixup, so the per-process data slices, the global gradient mean, the per-device random keys,
the checkpoints, the params.npz handed from phase to phase and the global eval all take part.
The digits are read in one global order (`input_pipeline`), so both layouts see the same
global batches and must end with the same params up to the order of the gradient sums.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from tests._commands import REPO, TrainCommand, free_port, process_group, wait_for
from vit_jax import checkpoint, train

PROCESSES, DEVICES_PER_PROCESS = 2, 4
HEARTBEAT_SECONDS = 10  # how long the survivors wait for a dead process
TEST_EXAMPLES = 360  # the digits' test split
_FINAL = re.compile(r"final test accuracy ([\d.]+) \(top-5 [\d.]+, loss ([\d.]+), (\d+) examples\)")

_CONFIG = """
    import ml_collections

    from configs import common


    def _phase(**fields):
        c = common.get_config()
        c.dataset = "sklearn_digits"
        c.model = common.model_config(
            "testing", patches={"size": (4, 4)}, transformer={"dropout_rate": 0.1}
        )
        c.update(batch_size=16, optimizer="sgd", base_lr=0.1, warmup_steps=3, mixup_alpha=0.2)
        c.update(log_every=5, checkpoint_every=5, eval_every=10)
        c.update(fields)
        return c


    def get_config(phases="pretrain,finetune"):
        config = ml_collections.ConfigDict()
        config.phases = tuple(phases.split(","))
        config.pretrain = _phase(image_size=8, total_steps=20)
        config.finetune = _phase(image_size=16, total_steps=10, pretrained="phase:pretrain")
        config.lock()
        return config
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "two_phase.py"
    path.write_text(textwrap.dedent(_CONFIG))
    return path


def _group(config_file, workdir) -> list[TrainCommand]:
    return process_group(
        config_file,
        workdir,
        processes=PROCESSES,
        devices=DEVICES_PER_PROCESS,
        heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
    )


@pytest.fixture(scope="module")
def runs(config_file, tmp_path_factory):
    """The uninterrupted runs, started together: {'one': [command], 'two': [commands]}."""
    root = tmp_path_factory.mktemp("runs")
    one = [TrainCommand(config_file, root / "one", devices=PROCESSES * DEVICES_PER_PROCESS)]
    two = _group(config_file, root / "two")
    for command in one + two:
        command.start()
    for command in one + two:
        assert command.wait() == 0, command.tail()
    yield {"one": one, "two": two}
    for command in one + two:
        command.kill()


def _params(command: TrainCommand, phase: str = "finetune"):
    return checkpoint.load(command.workdir / phase / train.PARAMS_FILE)


def _assert_close(a, b, atol: float) -> None:
    """Equal up to the order of the gradient sums (1 process × 8 devices vs 2 × 4)."""
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


def _final(command: TrainCommand) -> tuple[float, float, int]:
    """(accuracy, loss, examples) the command printed."""
    match = _FINAL.search(command.stdout.read_text())
    assert match, command.tail()
    return float(match[1]), float(match[2]), int(match[3])


def test_two_processes_train_what_one_process_trains(runs):
    (one,), two = runs["one"], runs["two"]
    for phase in ("pretrain", "finetune"):
        _assert_close(_params(two[0], phase), _params(one, phase), atol=1e-5)
    accuracy, loss, count = _final(one)
    for command in two:  # every process reports the global eval, every example counted once
        got_accuracy, got_loss, got_count = _final(command)
        assert got_count == count == TEST_EXAMPLES
        assert got_accuracy == pytest.approx(accuracy, abs=1 / TEST_EXAMPLES)
        assert got_loss == pytest.approx(loss, rel=1e-4)


def test_one_writer_files_once_and_a_log_per_process(runs):
    workdir = runs["two"][0].workdir
    for phase in ("pretrain", "finetune"):
        names = sorted(p.name for p in (workdir / phase).iterdir())
        assert len([n for n in names if n.startswith("events.out.tfevents")]) == 1, names
        assert train.PARAMS_FILE in names and train.CHECKPOINT_DIR in names
        for log in (train.LOG_FILE, "train.process1.log"):
            text = (workdir / phase / log).read_text()
            assert "eval accuracy=" in text and f"count={TEST_EXAMPLES}" in text, log
    checkpoints = sorted(int(p.name) for p in (workdir / "pretrain" / "checkpoints").iterdir())
    assert checkpoints == [15, 20]  # keep_checkpoints=2, written once by orbax


def test_stop_kill_and_resume_across_processes(config_file, runs, tmp_path):
    """The pretraining phase alone: SIGTERM to one process, then SIGKILL, then a full rerun."""
    pretrain_only, workdir = f"{config_file}:pretrain", tmp_path / "work"
    checkpoints = workdir / "pretrain" / train.CHECKPOINT_DIR

    # SIGTERM to process 1 only: both stop after the same step, and checkpoint it.
    group = _group(pretrain_only, workdir)
    try:
        for command in group:
            command.start()
        wait_for(checkpoints / "5", group)
        group[1].process.send_signal(signal.SIGTERM)
        assert [c.wait() for c in group] == [128 + signal.SIGTERM] * 2, group[0].tail()
    finally:
        for command in group:
            command.kill()
    logs = [workdir / "pretrain" / n for n in (train.LOG_FILE, "train.process1.log")]
    stopped = [
        re.search(r"Training stopped by SIGTERM after step (\d+)", p.read_text()) for p in logs
    ]
    assert all(stopped), [p.read_text()[-2000:] for p in logs]
    stop_step = int(stopped[0][1])
    assert int(stopped[1][1]) == stop_step and 5 < stop_step < 10
    assert max(int(p.name) for p in checkpoints.iterdir()) == stop_step

    # SIGKILL of process 1: process 0 ends on its own, with JAX naming the cause, in bounded time.
    group = _group(pretrain_only, workdir)
    try:
        for command in group:
            command.start()
        wait_for(checkpoints / "10", group)
        group[1].process.kill()
        killed_at = time.monotonic()
        returncode = group[0].wait(timeout=HEARTBEAT_SECONDS + 60)
        waited = time.monotonic() - killed_at
    finally:
        for command in group:
            command.kill()
    assert returncode != 0 and waited < HEARTBEAT_SECONDS + 60
    assert "another task died" in group[0].stderr.read_text(), group[0].tail()

    # The same command again resumes and ends where the uninterrupted run ended.
    group = _group(pretrain_only, workdir)
    try:
        for command in group:
            command.start()
        assert [c.wait() for c in group] == [0, 0], group[0].tail()
    finally:
        for command in group:
            command.kill()
    log = group[0].stderr.read_text()
    resumed = re.search(r"Resuming from the checkpoint of step (\d+)", log)
    assert resumed and int(resumed[1]) >= 10, log[-3000:]
    resumed, uninterrupted = _params(group[0], "pretrain"), _params(runs["two"][0], "pretrain")
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


_SLURM_PROBE = """
import jax
import numpy as np

from vit_jax import multihost

multihost.initialize()  # what --distributed does: JAX reads the SLURM variables
total = jax.pmap(lambda x: jax.lax.psum(x, "i"), "i")(np.ones(jax.local_device_count()))
print(jax.process_index(), jax.process_count(), jax.device_count(), int(total[0]))
"""


def test_distributed_detects_a_slurm_job(tmp_path):
    """`--distributed` under `srun`: coordinator, count and index come from SLURM's variables."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "SLURM_JOB_ID": "4242",
        "JAX_COORDINATOR_PORT": str(free_port()),  # instead of one derived from the job id
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NTASKS": "2",
    }
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", _SLURM_PROBE],
            env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in probes]
    for index, (probe, (stdout, stderr)) in enumerate(zip(probes, outputs, strict=True)):
        assert probe.returncode == 0, stderr[-3000:]
        assert stdout.splitlines()[-1].split() == [str(index), "2", "4", "4"]  # after gloo's
