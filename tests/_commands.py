"""`python -m vit_jax.main` as subprocesses, for the tests that interrupt runs for real.

Each command runs on its own number of fake CPU devices and writes its output to files beside
its workdir (a pipe nobody reads would fill and block the run). The compilation cache set up by
conftest.py reaches the subprocesses through the environment.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# On the PYTHONPATH of multi-process launches: its sitecustomize.py lets every process write
# its compiled programs to the compilation cache (JAX writes from process 0 only).
MULTIPROCESS_SITE = Path(__file__).resolve().parent / "_multiprocess_site"
WAIT_SECONDS = 240  # the longest any test command may take
SHARED_IMAGES = REPO / ".." / "shared" / "data" / "images"
# A line of TensorFlow's or XLA's native logging (`W0000 00:00:1796604084.875132 2573 png_io.cc:96]
# …`: before absl's logging is initialised, the time field is seconds since the epoch), or
# absl's preface to the first of them.
_NATIVE_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ |WARNING: All log messages before)"
)


def png_libpng_warns_about() -> Path | None:
    """A shared photo whose embedded colour profile makes libpng warn at every decode ("iCCP:
    known incorrect sRGB profile"), through TensorFlow's native logging: the run-time native
    warning a command's console must not show. None without the shared test data."""
    found = [p for p in sorted(SHARED_IMAGES.glob("*.png")) if b"iCCP" in p.read_bytes()]
    return found[0] if found else None


def native_log_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that native code logged rather than the command."""
    return [line for line in stderr.splitlines() if _NATIVE_LOG_LINE.match(line)]


def xla_flags(devices: int) -> str:
    """`XLA_FLAGS` for a test process on `devices` fake CPU devices."""
    # XLA's own thread pool is kept: `--xla_cpu_multi_thread_eigen=false` made the suite slower
    # on a 2-core AVX2-only machine (interleaved runs of 3 and of 5 modules: 3 to 10 % slower).
    return f"--xla_force_host_platform_device_count={devices}"


def subprocess_env(devices: int) -> dict[str, str]:
    """The environment for a Python subprocess of the tests: CPU only, `devices` fake devices,
    the repository importable (and conftest.py's compilation cache and fast-compiling XLA,
    inherited: the subprocesses' tiny models run a few dozen steps, and compiling is most of a
    cold launch). Without `TF_CPP_MIN_LOG_LEVEL`, as in a user's shell: jax sets it in this
    process when imported, and the commands choose their own."""
    return {
        **{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
        "XLA_FLAGS": xla_flags(devices),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


class TrainCommand:
    """`python -m vit_jax.main --config=F[:args] --workdir=W [args]` on `devices` fake CPU devices.

    Output goes to `<workdir>.<name>.out` / `.err`.
    """

    def __init__(
        self,
        config_file: Path | str,
        workdir: Path,
        *,
        devices: int = 2,
        args: Sequence[str] = (),
        name: str = "main",
    ):
        self.workdir = workdir
        self.args = [sys.executable, "-m", "vit_jax.main", f"--config={config_file}"]
        self.args += [f"--workdir={workdir}", *args]
        self.env = subprocess_env(devices)
        self.stdout = workdir.with_name(f"{workdir.name}.{name}.out")
        self.stderr = workdir.with_name(f"{workdir.name}.{name}.err")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=stdout, stderr=stderr)

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        """The exit status; stdout and stderr are in `self.stdout` / `self.stderr`."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def run(self) -> int:
        self.start()
        return self.wait()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Ends it if it still runs (test clean-up)."""
        if self.running():
            self.process.kill()
            self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.stderr.read_text()[-chars:]


def wait_for(path: Path, commands: Sequence[TrainCommand], seconds: float = 180) -> None:
    """Returns once `path` exists; AssertionError if a command ended first or time ran out."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        ended = [c for c in commands if not c.running()]
        assert not ended, f"{path} never appeared: {ended[0].args} ended.\n{ended[0].tail()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.005)


def signal_after(command: TrainCommand, ready: Path, signum: int) -> int:
    """Starts `command`, sends `signum` once `ready` exists, returns its exit status."""
    command.start()
    wait_for(ready, [command])
    command.process.send_signal(signum)
    return command.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group(
    config_file: Path | str,
    workdir: Path,
    *,
    processes: int,
    devices: int,
    heartbeat_timeout_seconds: int,
) -> list[TrainCommand]:
    """One command per process of a multi-process run on 127.0.0.1 (not started).

    Their PYTHONPATH starts with MULTIPROCESS_SITE, so a rerun compiles nothing again."""
    cluster = [
        f"--coordinator_address=127.0.0.1:{free_port()}",
        f"--num_processes={processes}",
        f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds}",
    ]
    group = [
        TrainCommand(
            config_file,
            workdir,
            devices=devices,
            args=[*cluster, f"--process_id={index}"],
            name=f"process{index}",
        )
        for index in range(processes)
    ]
    for command in group:
        command.env["PYTHONPATH"] = os.pathsep.join(
            [str(MULTIPROCESS_SITE), command.env["PYTHONPATH"]]
        )
    return group
