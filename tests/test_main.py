"""The command line `python -m vit_jax.main`: config errors in one line, positional args, a run."""

import ast
import importlib.util
import os
import re
import shutil
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

from tests._commands import REPO, native_log_lines, png_libpng_warns_about, subprocess_env

TIMEOUT_S = 120  # generous: the subprocess imports jax and TensorFlow on a busy 2-core CPU


def _cli(*args: str, python_options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python [OPTIONS] -m vit_jax.main ARGS` from the repo root (relative config paths resolve
    there)."""
    return subprocess.run(
        [sys.executable, *python_options, "-m", "vit_jax.main", *args],
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


def _tiny_folder_run(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """A 2-step fine-tuning of the tiny model on a 2-class folder of random 12 px images, and
    in the training split one photo whose decoding makes libpng warn (from ../shared)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                image = Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8))
                image.save(tmp_path / "data" / split / label / f"{i}.png")
    if (warned := png_libpng_warns_about()) is not None:  # with the shared test data
        shutil.copy(warned, tmp_path / "data" / "train" / "a" / "photo.png")
    return _cli(
        f"--workdir={tmp_path / 'run'}",
        f"--config=configs/finetune.py:testing,folder:{tmp_path / 'data'}",
        "--config.model.patches.size=(4,4)",
        "--config.image_size=8",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.warmup_steps=1",
        "--config.log_every=1",
        *overrides,
    )


def test_a_tiny_fine_tuning_run_prints_the_final_accuracy(tmp_path):
    workdir = tmp_path / "run"
    result = _tiny_folder_run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Random pixels: the accuracy is meaningless; the line's format and the count are not.
    pattern = r"final test accuracy \d\.\d{4} \(top-5 1\.0000, loss \d+\.\d{4}, 4 examples\)"
    assert re.search(pattern, result.stdout), result.stdout
    assert (workdir / "params.npz").is_file()
    # The console holds the run's own lines: what is trained on what first, no framework chatter.
    lines = result.stderr.splitlines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d training testing \(width 10, 1 layers, 2 heads, 4×4 px patches\) for "
        r"classification on "
        r"folder:.*data \[train\] at 8 px, 2 steps of batch 8 on 8 devices, from scratch; "
        r"evaluating on \[test\]",
        lines[0],
    ), lines[:3]
    chatter = ("orbax", "CheckpointManager", "oneDNN", "absl::InitializeLog", "Hyperparameters")
    assert not [line for line in lines if any(word in line for word in chatter)], lines
    assert not native_log_lines(result.stderr), lines  # libpng's warning on the photo, say
    assert any(re.search(r"\[2\] train/grad_norm=.*train/loss=", line) for line in lines)
    assert any(re.search(r"step 2 eval accuracy=", line) for line in lines)


def test_an_error_after_start_up_is_one_line_and_recorded_in_train_log(tmp_path):
    result = _tiny_folder_run(tmp_path, "--config.test_split=nope")  # found when listing splits
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    message = "has splits ('train', 'test'), got 'nope'"
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "--verbose shows the traceback" in result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "The run stopped: ValueError" in log and message in log


def _imported_modules(importtime_stderr: str) -> set[str]:
    """The modules `python -X importtime` reported (`import time: self | cumulative | name`)."""
    prefix = "import time:"
    lines = [line for line in importtime_stderr.splitlines() if line.startswith(prefix)]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # [0] is the header


def test_a_missing_pretrained_file_of_a_later_phase_is_reported_before_tensorflow_loads(tmp_path):
    missing = tmp_path / "nothing_here.npz"
    result = _cli(
        f"--workdir={tmp_path / 'run'}",
        f"--config.finetune.pretrained={missing}",
        python_options=("-X", "importtime"),
    )
    assert result.returncode == 1
    assert (
        f"Error: Phase 'finetune' (--config.finetune.<key>): Checkpoint not found: '{missing}'"
        in (result.stderr)
    )
    assert not (tmp_path / "run" / "pretrain").exists()  # the first phase never started
    # Every config check ran before the data pipeline and the TensorBoard writers were
    # imported: TensorFlow takes seconds to load, a config error need not wait for it.
    imported = _imported_modules(result.stderr)
    assert {"jax", "vit_jax.run_config", "vit_jax.tasks"} <= imported, sorted(imported)[:20]
    assert not {"tensorflow", "clu.metric_writers", "vit_jax.input_pipeline"} & imported


def test_an_override_of_a_phase_key_without_its_phase_names_the_phase_keys(tmp_path):
    result = _cli(f"--workdir={tmp_path / 'run'}", "--config.total_steps=3")
    assert result.returncode == 1
    assert (
        "This config runs phases ('pretrain', 'finetune'): write --config.pretrain.total_steps "
        "or --config.finetune.total_steps." in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_helpshort_says_how_configs_presets_and_overrides_work():
    result = _cli("--helpshort")
    text = result.stdout + result.stderr
    for needed in (
        "configs/finetune.py:MODEL,DATASET",
        "configs/pretrain.py:MODEL",
        "configs/regression.py:MODEL,CSV",
        "--config.KEY=VALUE",
        "configs/common.py",
        "--config.finetune.KEY",
        "--workdir",
    ):
        assert needed in text, needed


# The commands that read images, whose native log level native_notices sets when imported first.
_IMAGE_COMMANDS = ("main", "predict", "attention", "prepare_data", "fewshot")


@pytest.mark.parametrize("name", _IMAGE_COMMANDS)
def test_a_command_imports_native_notices_before_jax_and_tensorflow(name):
    """jax sets TensorFlow's native log level at import (warnings on) unless it is set, so a
    command's quiet console depends on importing native_notices first (test_predict and the
    tiny folder run above check the console itself for two of them)."""
    tree = ast.parse((REPO / "vit_jax" / f"{name}.py").read_text())
    modules = []  # the module-level imports, in order
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            modules += names if node.module == "vit_jax" else [node.module]
    loads_jax = ("jax", "flax", "optax", "tensorflow", "vit_jax.")
    first = next(i for i, m in enumerate(modules) if m.startswith(loads_jax))
    assert modules[first] == "vit_jax.native_notices", modules
