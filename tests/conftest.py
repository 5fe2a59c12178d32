"""Shared pytest setup, done before jax is imported: 8 fake CPU devices for the multi-device
tests, a persistent compilation cache shared by the tests and their subprocesses, XLA without
its expensive optimisations, and the grouping of tests over pytest-xdist's workers.

Most of the suite's time is XLA compiling the same tiny models and steps again in test after
test (and in the command-line subprocesses); the cache compiles each once per run. It lives in
a fresh directory per run, so nothing compiled by an older checkout is ever reused.

Most tests then run their programs for a few steps, so compiling fast matters more than running
fast: `JAX_DISABLE_MOST_OPTIMIZATIONS` (XLA's backend optimisation level 0 and no expensive LLVM
passes) is the default for the tests and every subprocess they start. The few tests that train
for hundreds of steps are marked `@pytest.mark.optimized` and compile with the full
optimisation, since running is most of their time.
"""

import atexit
import os
import shutil
import tempfile

import pytest

from tests._commands import xla_flags  # the standard library only: jax is not imported

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="vit_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The suite runs on two xdist workers (`-n 2 --dist loadgroup` in pyproject.toml): one per core,
# since a test mostly compiles or runs a tiny model on one thread. Each module goes to one
# worker as a whole, so its module-scoped fixtures (trained runs, generated datasets) are made
# once; the modules that share the session's two-phase reference run share a worker too.
# (The variables above are set in the controlling process before the workers start, so every
# worker and subprocess uses the one compilation cache.)
_SHARED_GROUPS = {"test_multihost": "two_phase_run", "test_train_resume": "two_phase_run"}
# xdist hands the groups to the workers in collection order (`--no-loadscope-reorder` in
# pyproject.toml; by default it would sort them by their number of tests), so the longest go
# first: the last groups to start are short and the two workers finish together. Worker-seconds
# of the longest groups, from `--durations=0` on a 2-core AVX2-only machine (2026-12-07); a
# group not listed counts 0 and runs after these, in collection order.
_GROUP_SECONDS = {
    "two_phase_run": 195,
    "test_models": 136,
    "test_main": 84,
    "test_records": 82,
    "test_ssl": 77,
    "test_regression": 70,
    "test_train": 66,
    "test_finetune_swin_beit": 49,
    "test_e2e": 46,
    "test_distillation": 42,
    "test_checkpoint": 30,
    "test_predict": 27,
    "test_benchmarks": 23,
    "test_notebooks": 22,
    "test_learns": 21,
    "test_timm_weights": 19,
    "test_input_norm": 16,
    "test_interop_timm_deit": 16,
    "test_interop_timm_swin": 14,
    "test_interop_timm": 14,
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "optimized: compile this test's programs with XLA's full optimisation"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Full optimisation for the setup, call and teardown of a test marked `optimized` (and the
    module fixtures its setup makes); the flag is read by every compile, so it holds for exactly
    the programs compiled meanwhile."""
    if item.get_closest_marker("optimized") is None:
        return (yield)
    import jax

    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        return (yield)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        groups[item] = _SHARED_GROUPS.get(module, module)
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    items.sort(key=lambda item: -_GROUP_SECONDS.get(groups[item], 0))  # stable: tests keep order


@pytest.fixture(scope="session")
def two_phase_reference(tmp_path_factory):
    """The uninterrupted two-phase run of tests/_two_phase_run.py, shared by test_multihost.py
    and test_train_resume.py; it runs in the background from the first test that asks for it."""
    from tests._two_phase_run import Reference

    reference = Reference(tmp_path_factory.mktemp("two_phase_reference"))
    yield reference
    reference.kill()
