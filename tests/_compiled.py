"""Flax `init` and `apply` compiled as one program each.

Called eagerly, a transformer's `init` or `apply` compiles every op on its own: hundreds of tiny
XLA compiles, seconds per test. Under `jax.jit` it is one compile (found in the suite's
compilation cache when another test built the same program).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def init_params(model: nn.Module, x: Any, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """`model.init(PRNGKey(seed), x, train=False, **kwargs)["params"]`, compiled."""
    kwargs.setdefault("train", False)
    return jax.jit(lambda x: model.init(jax.random.PRNGKey(seed), x, **kwargs))(x)["params"]


def apply(model: nn.Module, params: Any, x: Any, **kwargs: Any) -> Any:
    """`model.apply({"params": params}, x, train=False, **kwargs)`, compiled (`rngs` and
    `mutable` are passed through)."""
    kwargs.setdefault("train", False)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, **kwargs))(params, x)
