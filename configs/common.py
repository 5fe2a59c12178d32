"""Helpers shared by the run configs.

Run configs describe the model by zoo name plus overrides and store the resulting constructor
arguments in `config.model`, so a run's saved config records exactly what was built.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vit_jax import models


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`config.model` for zoo model `name`: its constructor arguments with `overrides` applied.

    Unknown names fail listing close matches; unknown keys fail listing the valid ones.
    """
    return models.model_config(name, **overrides)
