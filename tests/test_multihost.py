"""Multi-process training: 2 local processes × 4 fake CPU devices against 1 process × 8.

The processes run `python -m vit_jax.main` with `--coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=I` (JAX's multi-controller runtime, gloo collectives on CPU).
The run is a two-phase pretrain (8 px) → fine-tune (16 px) on the embedded digits, with dropout
and mixup, so the per-process data slices, the global gradient mean, the per-device random keys,
the checkpoints, the params.npz handed from phase to phase and the global eval all take part.

The 2-process run is interrupted as a cluster interrupts it: SIGTERM to one process, then (after
a rerun) SIGKILL of one process, then a rerun to the end. The digits are read in one global
order (`input_pipeline`), so it must end with the params of the uninterrupted 1-process run, up
to the order of the gradient sums. (Bit-exact resume is tested in one process, in
test_train_resume.py.)
"""

import contextlib
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from tests import _two_phase_run
from tests._commands import (
    TrainCommand,
    free_port,
    process_group,
    subprocess_env,
    wait_for,
)
from vit_jax import checkpoint, multihost, train

PROCESSES, DEVICES_PER_PROCESS = 2, 4
HEARTBEAT_SECONDS = 10  # how long the survivors wait for a dead process
CHECKPOINT_EVERY = _two_phase_run.CHECKPOINT_EVERY
TEST_EXAMPLES = 360  # the digits' test split
_FINAL = re.compile(r"final test accuracy ([\d.]+) \(top-5 [\d.]+, loss ([\d.]+), (\d+) examples\)")


@dataclasses.dataclass
class _Interrupted:
    """What the interrupted 2-process run did, launch by launch."""

    one: TrainCommand  # the uninterrupted 1-process run (shared with test_train_resume.py)
    workdir: Path
    stop_steps: list[int]  # the step each process stopped after, on SIGTERM to process 1
    stop_returncodes: list[int]
    kill_after: int  # process 1 was SIGKILLed once the checkpoint of this step was complete
    kill_returncode: int  # process 0's, after that
    kill_wait_seconds: float
    kill_stderr: str
    final: list[TrainCommand]  # the rerun that finished


def _group(config_file: Path, workdir: Path) -> list[TrainCommand]:
    return process_group(
        config_file,
        workdir,
        processes=PROCESSES,
        devices=DEVICES_PER_PROCESS,
        heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
    )


@contextlib.contextmanager
def _started(group: list[TrainCommand]) -> Iterator[list[TrainCommand]]:
    try:
        for command in group:
            command.start()
        yield group
    finally:
        for command in group:
            command.kill()


@pytest.fixture(scope="module")
def interrupted(two_phase_reference, tmp_path_factory) -> Iterator[_Interrupted]:
    assert _two_phase_run.DEVICES == PROCESSES * DEVICES_PER_PROCESS
    config_file = two_phase_reference.config_file  # the reference runs alongside
    workdir = tmp_path_factory.mktemp("runs") / "two"
    checkpoints = workdir / "pretrain" / train.CHECKPOINT_DIR
    # SIGTERM to process 1 only.
    with _started(_group(config_file, workdir)) as group:
        wait_for(checkpoints / str(CHECKPOINT_EVERY), group)
        group[1].process.send_signal(signal.SIGTERM)
        stop_returncodes = [c.wait() for c in group]
    pattern = re.compile(r"Training stopped by SIGTERM after step (\d+)")
    logs = [workdir / "pretrain" / n for n in (train.LOG_FILE, "train.process1.log")]
    stopped = [pattern.search(p.read_text()) for p in logs]
    assert all(stopped), [p.read_text()[-2000:] for p in logs]

    # SIGKILL of process 1 after the next checkpoint.
    kill_after = (int(stopped[0][1]) // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
    with _started(_group(config_file, workdir)) as group:
        wait_for(checkpoints / str(kill_after), group)
        group[1].process.kill()
        killed_at = time.monotonic()
        kill_returncode = group[0].wait(timeout=HEARTBEAT_SECONDS + 60)
        kill_wait_seconds = time.monotonic() - killed_at
    kill_stderr = group[0].stderr.read_text()  # before the rerun writes the same file

    # The same command again, to the end.
    with _started(_group(config_file, workdir)) as final:
        assert [c.wait() for c in final] == [0, 0], final[0].tail()
    yield _Interrupted(
        one=two_phase_reference.finished(),
        workdir=workdir,
        stop_steps=[int(m[1]) for m in stopped],
        stop_returncodes=stop_returncodes,
        kill_after=kill_after,
        kill_returncode=kill_returncode,
        kill_wait_seconds=kill_wait_seconds,
        kill_stderr=kill_stderr,
        final=final,
    )


def _params(workdir: Path, phase: str):
    return checkpoint.load(workdir / phase / train.PARAMS_FILE)


def _final(command: TrainCommand) -> tuple[float, float, int]:
    """(accuracy, loss, examples) the command printed."""
    match = _FINAL.search(command.stdout.read_text())
    assert match, command.tail()
    return float(match[1]), float(match[2]), int(match[3])


def test_sigterm_to_one_process_stops_all_after_the_same_step(interrupted):
    step = interrupted.stop_steps[0]
    assert interrupted.stop_returncodes == [128 + signal.SIGTERM] * PROCESSES
    # checked every STOP_CHECK_EVERY steps, agreed at the next check
    assert interrupted.stop_steps == [step] * PROCESSES and CHECKPOINT_EVERY < step < 30
    assert step % multihost.STOP_CHECK_EVERY == 0
    assert (
        f"Resuming from the checkpoint of step {step} "
        in (interrupted.workdir / "pretrain" / train.LOG_FILE).read_text()
    )


def test_a_killed_process_ends_the_others_in_bounded_time(interrupted):
    assert interrupted.kill_returncode != 0
    assert interrupted.kill_wait_seconds < HEARTBEAT_SECONDS + 60
    assert "another task died" in interrupted.kill_stderr, interrupted.kill_stderr[-3000:]


def test_the_rerun_resumes_and_ends_with_the_one_process_params(interrupted):
    log = interrupted.final[0].stderr.read_text()
    resumed = re.search(r"Resuming from the checkpoint of step (\d+)", log)
    assert resumed and int(resumed[1]) >= interrupted.kill_after, log[-3000:]
    for phase in ("pretrain", "finetune"):
        two, one = _params(interrupted.workdir, phase), _params(interrupted.one.workdir, phase)
        for (path, x), y in zip(
            jax.tree_util.tree_leaves_with_path(two), jax.tree.leaves(one), strict=True
        ):  # equal up to the order of the gradient sums
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"{phase}{path}")


def test_every_process_reports_the_global_eval_of_every_example_once(interrupted):
    accuracy, loss, count = _final(interrupted.one)
    for command in interrupted.final:
        got_accuracy, got_loss, got_count = _final(command)
        assert got_count == count == TEST_EXAMPLES
        assert got_accuracy == pytest.approx(accuracy, abs=1 / TEST_EXAMPLES)
        assert got_loss == pytest.approx(loss, rel=1e-4)


def test_one_writer_files_once_and_a_log_per_process(interrupted):
    finetune = interrupted.workdir / "finetune"  # reached by the final launch only
    names = sorted(p.name for p in finetune.iterdir())
    assert len([n for n in names if n.startswith("events.out.tfevents")]) == 1, names
    assert train.PARAMS_FILE in names
    for log in (train.LOG_FILE, "train.process1.log"):
        text = (finetune / log).read_text()
        assert "eval accuracy=" in text and f"count={TEST_EXAMPLES}" in text, log
    checkpoints = sorted(int(p.name) for p in (finetune / train.CHECKPOINT_DIR).iterdir())
    assert checkpoints == [5, 10]  # keep_checkpoints=2, written once by orbax


_SLURM_PROBE = """
import json
import sys

import jax
import numpy as np

from vit_jax import indexed_sources, input_pipeline, multihost

multihost.initialize()  # what --distributed does: JAX reads the SLURM variables
total = jax.pmap(lambda x: jax.lax.psum(x, "i"), "i")(np.ones(jax.local_device_count()))

decoded = []  # the files this process decodes to validate the folder
check = indexed_sources._is_readable_image
indexed_sources._is_readable_image = lambda path: decoded.append(path) or check(path)
info = input_pipeline.get_dataset_info(
    "folder:" + sys.argv[1],
    train_split="train",
    test_split="test",
    process_index=jax.process_index(),
    process_count=jax.process_count(),
)
root = indexed_sources.os.path.abspath(sys.argv[1])
kept = indexed_sources._scan_folder_split(
    root, "train", info.class_names, jax.process_index(), jax.process_count()
)[0]
print(json.dumps({
    "process": [jax.process_index(), jax.process_count(), jax.device_count(), int(total[0])],
    "decoded": decoded,
    "kept": list(kept),
    "num_examples": info.num_examples,
}))
"""


@pytest.fixture(scope="module")
def slurm_probes(tmp_path_factory) -> list[dict]:
    """2 processes under fake `srun` variables: start-up, a psum, an image folder's validation."""
    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 5), ("test", 1)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (6, 5), (40 * i, 0, 0)).save(root / split / label / f"{i}.png")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    env = {
        **subprocess_env(devices=2),
        "SLURM_JOB_ID": "4242",
        "JAX_COORDINATOR_PORT": str(free_port()),  # instead of one derived from the job id
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NTASKS": "2",
    }
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", _SLURM_PROBE, str(root)],
            env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in probes]
    for probe, (_, stderr) in zip(probes, outputs, strict=True):
        assert probe.returncode == 0, stderr[-3000:]
    return [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]  # after gloo's lines


def test_distributed_detects_a_slurm_job(slurm_probes):
    """`--distributed` under `srun`: coordinator, count and index come from SLURM's variables."""
    assert [p["process"] for p in slurm_probes] == [[0, 2, 4, 4], [1, 2, 4, 4]]


def test_processes_split_an_image_folders_validation(slurm_probes):
    """Each process decodes its share of the 13 files; all get the same 10 readable ones."""
    decoded = [set(p["decoded"]) for p in slurm_probes]
    assert not decoded[0] & decoded[1]
    assert sorted(len(d) for d in decoded) == [6, 7]  # 11 train + 2 test files, split
    kept = slurm_probes[0]["kept"]
    assert slurm_probes[1]["kept"] == kept
    assert any(path.endswith("broken.jpg") for path in decoded[0] | decoded[1])
    assert len(kept) == 10 and not any(path.endswith("broken.jpg") for path in kept)
    assert all(p["num_examples"] == {"train": 10, "test": 2} for p in slurm_probes)
