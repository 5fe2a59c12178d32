"""Shared pytest setup: fake CPU devices for the multi-device tests (set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
