"""Makes `import torchvision` work next to a CPU-only torch, for the timm interop tests.

Why this exists: timm imports torchvision at import time. With the CPU wheel of torch
(`torch==2.13.0+cpu`) pip installs the default (CUDA) wheel of `torchvision==0.28.0`, whose
compiled ops library `torchvision/_C.so` cannot load (it links `libc10_cuda.so`). torchvision
tolerates that for most ops, but `torchvision/_meta_registrations.py` registers fake kernels for
`torchvision::nms` and `torchvision::qnms` without checking that the ops exist, so the import dies
with `RuntimeError: operator torchvision::nms does not exist`.

`ensure_torchvision_importable()` declares those two op schemas (no kernels) in a
`torch.library.Library("torchvision", "DEF")` and imports torchvision again. The ops stay
unusable (calling them fails), which is fine: the tests only use timm's ViT, which never calls
them. Where torchvision imports cleanly (a matching CPU or CUDA build), this does nothing.
"""

from __future__ import annotations

import sys

# Ops that torchvision registers fake (meta) kernels for without checking that they exist.
_UNGUARDED_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Keeps the schema definitions alive: a torch Library removes its definitions when collected.
_LIBRARY = None


def _forget_torchvision() -> None:
    """Drops the half-imported torchvision modules so that the next import starts afresh."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision_importable() -> bool:
    """Imports torchvision, declaring its missing op schemas first if needed.

    Returns True when the workaround was applied, False when it was not needed (torchvision
    imported as it is) or cannot help (torch or torchvision is not installed; the caller's
    `pytest.importorskip` then reports that). Any other import error is raised unchanged.
    """
    global _LIBRARY
    try:
        import torchvision  # the import is the check
    except ImportError:
        return False
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    else:
        return False

    import torch

    _forget_torchvision()
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for schema in _UNGUARDED_OPS:
            _LIBRARY.define(schema)
    import torchvision  # noqa: F401

    return True


INSTALL = "timm interop tests need torch, torchvision and timm: pip install -e '.[interop]'"


def require_timm():
    """(torch, timm) for a timm interop test module, or a module-level skip saying what to install.

    Called at the top of the module: torch first, then torchvision made importable (above),
    then timm.
    """
    import pytest

    torch = pytest.importorskip("torch", reason=INSTALL)
    ensure_torchvision_importable()
    pytest.importorskip("torchvision", reason=INSTALL)
    return torch, pytest.importorskip("timm", reason=INSTALL)
