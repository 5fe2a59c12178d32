"""Shared pytest setup, done before jax is imported: 8 fake CPU devices for the multi-device
tests, and a persistent compilation cache shared by the tests and their subprocesses.

Most of the suite's time is XLA compiling the same tiny models and steps again in test after
test (and in the command-line subprocesses); the cache compiles each once per run. It lives in
a fresh directory per run, so nothing compiled by an older checkout is ever reused.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="vit_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(scope="session")
def two_phase_reference(tmp_path_factory):
    """The uninterrupted two-phase run of tests/_two_phase_run.py, shared by test_multihost.py
    and test_train_resume.py; it runs in the background from the first test that asks for it."""
    from tests._two_phase_run import Reference

    reference = Reference(tmp_path_factory.mktemp("two_phase_reference"))
    yield reference
    reference.kill()
