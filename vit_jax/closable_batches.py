"""`ClosableBatches`: a tf.data dataset's numpy batches that never hang the interpreter's exit.

This module owns closing the tf.data iterators that `vit_jax.input_pipeline` hands out: by their
user (`close()`), or at exit by an `atexit` hook.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

Batch = dict[str, Any]


class ClosableBatches:
    """A tf.data dataset's numpy batches, released by `close()` or, at the latest, at exit.

    A tf.data iterator still alive when the interpreter finalises can hang the exit for good:
    its destructor waits for in-flight calls into Python (path lookups, record reads) that can
    no longer take the GIL. Every iterator this module hands out is therefore closed by an
    `atexit` hook, which runs while Python is still whole, if its user has not closed it.
    """

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator: Iterator[Batch] | None = iter(dataset.as_numpy_iterator())
        _LIVE_ITERATORS.add(self)

    def __iter__(self) -> ClosableBatches:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        self._iterator = None  # the tf.data iterator's last reference: its threads stop now


_LIVE_ITERATORS: weakref.WeakSet[ClosableBatches] = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for batches in list(_LIVE_ITERATORS):
        batches.close()
