"""The README's commands stay true: every `python -m vit_jax.*` line in its bash blocks parses.

Each `vit_jax.main` command is parsed by the real flag parser (config file, its argument and
every `--config.key=value` override), and the resulting config must pass
`train.validate_config` on 8 devices; `predict` and `attention` commands must parse with their
own argument parsers. Training itself is covered by the end-to-end tests.
"""

import copy
import re
import shlex
import sys
import warnings
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from vit_jax import attention, predict, run_config

with warnings.catch_warnings():  # ml_collections loads the default config with load_module()
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    from vit_jax import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _commands(module: str) -> list[list[str]]:
    """Argument lists of `python -m <module>` lines in the README's bash blocks."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("#", 1)[0]
            for part in command.split("&&"):
                words = shlex.split(part)
                for start in range(len(words)):  # after a launcher such as `srun`
                    if words[start : start + 3] == ["python", "-m", module]:
                        found.append(words[start + 3 :])
    return found


def test_the_readme_has_the_commands_it_documents():
    # main job, fine-tune, pretrain, image folder, TPU pod, SLURM, explicit coordinator
    assert len(_commands("vit_jax.main")) >= 7
    assert _commands("vit_jax.predict") and _commands("vit_jax.attention")


@pytest.mark.parametrize("args", _commands("vit_jax.main"), ids=lambda a: " ".join(a)[:60])
def test_readme_training_commands_parse_and_validate(monkeypatch, args):
    monkeypatch.chdir(README.parent)  # config paths in the README are relative to the repo
    # main's own flags (--workdir, --config as main defines it) on a fresh registry, so every
    # command is parsed from scratch by the same absl / ml_collections parser. ml_collections
    # reads `--config=` from sys.argv when the flag is defined, as it does in main.
    monkeypatch.setattr(sys, "argv", ["vit_jax.main", *args])
    flag_values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    for name in main.HOST_FLAGS:  # --distributed, --coordinator_address, ...: copies
        flag_values[name] = copy.deepcopy(flags.FLAGS[name])
    config_flags.DEFINE_config_file(
        "config", main.default_config_path(), "", flag_values=flag_values, lock_config=True
    )
    flag_values(sys.argv)
    config = flag_values.config
    phases = [config[name] for name in config.phases] if "phases" in config else [config]
    for phase in phases:
        run_config.validate_config(phase, 8, 8)
    assert flag_values.workdir


@pytest.mark.parametrize(
    ("module", "parser"),
    [("vit_jax.predict", predict.build_parser), ("vit_jax.attention", attention.build_parser)],
)
def test_readme_prediction_commands_parse(module, parser):
    for args in _commands(module):
        parsed = parser().parse_args(args)
        assert parsed.checkpoint and parsed.model
