"""Command line: `python -m vit_jax.main --workdir=DIR [--config=FILE[:args]] [--config.k=v]`.

Without `--config` it runs the offline main job `configs/default.py`. The config is locked, so
an override of a key the config does not declare fails naming the key. A config with `phases`
runs its sub-configs in order (`train.train_phases`); any other runs `train.train_and_evaluate`.
"""

from __future__ import annotations

import logging
import pathlib

from absl import app, flags
from ml_collections import config_flags

from vit_jax import train

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py"

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for params.npz and run outputs.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Run config file (and ':args').", lock_config=True
)
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    config = _CONFIG.value
    if "phases" in config:
        results = train.train_phases(config, _WORKDIR.value)
        final = results[config.phases[-1]]
    else:
        _, final = train.train_and_evaluate(config, _WORKDIR.value)
    print(
        f"final test accuracy {final['accuracy']:.4f} (top-5 {final['accuracy_top5']:.4f}, "
        f"loss {final['loss']:.4f}, {int(final['count'])} examples)"
    )


if __name__ == "__main__":
    app.run(main)
