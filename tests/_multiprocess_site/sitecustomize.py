"""Imported at start-up by the multi-process test launches (this folder is on their PYTHONPATH).

JAX writes persistent compilation cache entries from process 0 only, and a program's cache key
includes the process index, so without this every launch of a multi-process test run compiles
everything again in the processes other than 0 (and process 0 waits for them at the first
collective): about 10-40 s per launch on a 2-core CPU. Here every process writes its own entries
(into the test run's fresh cache directory, see conftest.py), so a rerun of the same command
compiles nothing. Only the test's cache changes; what runs is `python -m vit_jax.main` as is.
"""

import contextlib
import functools


def _write_from_every_process() -> None:
    from jax._src import compilation_cache, compiler, distributed

    write = compiler._cache_write

    @functools.wraps(write)
    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, callbacks):
        if distributed.global_state.process_id == 0 or callbacks:
            return write(cache_key, compile_time_secs, module_name, backend, executable, callbacks)
        with contextlib.suppress(Exception):  # an entry not written only costs the time
            compilation_cache.put_executable_and_time(
                cache_key, module_name, executable, backend, int(compile_time_secs)
            )
        return None

    compiler._cache_write = cache_write


with contextlib.suppress(ImportError, AttributeError):  # another jax: they only compile more
    _write_from_every_process()
