"""The command line `python -m vit_jax.main`: config errors in one line, positional args, a run."""

import importlib.util
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from absl import app
from PIL import Image

with warnings.catch_warnings():  # ml_collections loads the default config with load_module()
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    from vit_jax import main

from tests._commands import REPO, subprocess_env

TIMEOUT_S = 120  # generous: the subprocess imports jax and TensorFlow on a busy 2-core CPU


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m vit_jax.main ARGS` from the repo root (relative config paths resolve there)."""
    return subprocess.run(
        [sys.executable, "-m", "vit_jax.main", *args],
        cwd=REPO,
        env=subprocess_env(devices=8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_default_config_is_the_module_configs_default():
    path = main.default_config_path()
    assert path == importlib.util.find_spec("configs.default").origin
    assert path.endswith(os.path.join("configs", "default.py")) and os.path.isfile(path)


@pytest.mark.parametrize(
    ("config", "override", "hint"),
    [
        (  # the default config (parsed at import), a key of one of its phases
            [],
            "--config.finetune.batchsize=7",
            'Did you mean "batch_size" instead of "batchsize"?',
        ),
        (
            ["--config=configs/finetune.py:testing,cifar10"],
            "--config.batchsize=3",
            'Did you mean "batch_size" instead of "batchsize"?',
        ),
    ],
    ids=["default", "finetune"],
)
def test_unknown_config_key_fails_in_one_line_naming_it(tmp_path, config, override, hint):
    workdir = tmp_path / "run"
    result = _cli(f"--workdir={workdir}", *config, override)
    assert result.returncode == 1
    flag = override.split("=")[0]
    assert f"Unknown config key {flag}: the config declares no 'batchsize'." in result.stderr
    assert hint in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # nothing ran


def test_stray_positional_arguments_are_rejected():
    with pytest.raises(app.UsageError, match=r"Unexpected arguments: \['extra'\]"):
        main.main(["vit_jax.main", "extra"])


def test_unknown_config_key_message_names_the_flag():
    error = AttributeError(KeyError("'batchsize'\nDid you mean \"batch_size\"?"))
    argv = ["prog", "--config.finetune.batchsize=3"]
    message = main._unknown_key_message(error, argv)
    assert message.startswith("Unknown config key --config.finetune.batchsize:")
    assert 'Did you mean "batch_size"?' in message
    assert main._unknown_key_message(AttributeError("'other'"), argv) is None  # not an override


def test_a_tiny_fine_tuning_run_prints_the_final_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                image = Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8))
                image.save(tmp_path / "data" / split / label / f"{i}.png")
    workdir = tmp_path / "run"
    result = _cli(
        f"--workdir={workdir}",
        f"--config=configs/finetune.py:testing,folder:{tmp_path / 'data'}",
        "--config.model.patches.size=(4,4)",
        "--config.image_size=8",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.warmup_steps=1",
        "--config.log_every=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pattern = r"final test accuracy (\d\.\d{4}) \(top-5 1\.0000, loss \d+\.\d{4}, 4 examples\)"
    match = re.search(pattern, result.stdout)
    assert match, result.stdout
    assert 0.0 <= float(match.group(1)) <= 1.0
    assert (workdir / "params.npz").is_file()
