"""TensorFlow's native start-up notices, kept off the console of the package's commands.

TensorFlow's native libraries print notices at import (`oneDNN custom operations are on`,
`All log messages before absl::InitializeLog() is called…`) straight to file descriptor 2,
where Python's stderr redirection does not reach them. The commands that read images
(`vit_jax.main`, `predict`, `attention`, `prepare_data`, `fewshot`) import it inside
`hidden_for_command`, so their console shows only their own lines; `--verbose` shows the
notices.

After import, the native code still logs warnings to the console at run time: libpng's
"iCCP: known incorrect sRGB profile" at every decode of such a PNG, for one, with absl's
"before InitializeLog" preface when it is the process's first native log (as it is on CPUs
where TensorFlow prints no oneDNN notice at import). So when a `vit_jax` module runs as a
command without `--verbose`, importing this module sets the native log level to errors only
(`TF_CPP_MIN_LOG_LEVEL=2`, unless it is set already). Importing jax sets it to 1 (warnings
shown) unless it is set, and TensorFlow reads it when it loads, so a command imports this
module before jax.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def _runs_as_command() -> bool:
    """Whether the program is a `vit_jax` module run with `python -m` (not a library user's)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("vit_jax.")


def verbose_requested() -> bool:
    """`--verbose` on the command line, read before the flags are parsed (the notices come at
    import, before a flag parser runs)."""
    return "--verbose" in sys.argv


if _runs_as_command() and not verbose_requested():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # native errors still show


@contextlib.contextmanager
def stderr_hidden(hide: bool = True) -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null inside (when `hide`).

    Python errors raised inside still reach the console: they are printed after the descriptor
    is restored.
    """
    if not hide:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def hidden_for_command(module_name: str) -> contextlib.AbstractContextManager[None]:
    """`stderr_hidden` when the module `module_name` (its `__name__`) runs as a command without
    `--verbose`; nothing when it is imported as a library."""
    return stderr_hidden(module_name == "__main__" and not verbose_requested())
