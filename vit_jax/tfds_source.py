"""tfds datasets as a `Source`, and preparing them offline-safely.

This module owns reading a tfds split (`load_source`: this process's even part, images left
encoded) and everything about a dataset that is not prepared yet: before tfds downloads it, its
download hosts must answer within `_PROBE_TIMEOUT_S` and the modules tfds needs without declaring
them must be installed; otherwise one clear error (`DatasetUnavailableError`, or a
`ModuleNotFoundError` with the `pip install`) says how to prepare the data on another machine and
copy it here, instead of tfds retrying for minutes without a word.

It does not own preprocessing, batching or the other sources (`vit_jax.input_pipeline`,
`vit_jax.indexed_sources`).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import image_folder
from vit_jax.source import Source, check_process


def load_source(
    name: str,
    split: str,
    process_index: int,
    process_count: int,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    download: bool,
    shuffle_seed: int | None,
) -> Source:
    """This process's even part of a tfds split, images left encoded until after skipping."""
    check_process(process_index, process_count)
    own_split = split
    if process_count > 1:
        own_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds, info = _tfds_load(
        name,
        own_split,
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        shuffle_seed=shuffle_seed,
    )
    own = _count(ds)
    try:
        total = info.splits[split].num_examples
    except (KeyError, ValueError):  # tfds mock_data has no split info
        total = own * process_count
    label = info.features["label"]
    label = getattr(label, "feature", label)  # Sequence(ClassLabel) for multi-label sets
    names = tuple(label.names) if getattr(label, "names", None) else None
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    return Source(
        ds,
        image_folder.decode_encoded,
        own,
        max(own, math.ceil(total / process_count)),
        label.num_classes,
        names,
        total,
    )


class DatasetUnavailableError(FileNotFoundError):
    """A tfds dataset that is neither prepared in its data_dir nor preparable here and now."""


# How long `_tfds_load` waits for the download hosts of an unprepared dataset to answer before
# giving up (tfds's own downloader retries an unreachable host for minutes, silently).
_PROBE_TIMEOUT_S = 10.0
_PROBED_HOSTS_MAX = 8
_DEFAULT_PORTS = {"https": 443, "http": 80, "ftp": 21}
_TFDS_DEFAULT_DIR = "~/tensorflow_datasets"
_TFDS_UNDECLARED = ("importlib_resources",)  # see `_tfds_undeclared_modules`
# tfds's own code when `download_and_prepare` is the real one (`tfds.testing.mock_data` replaces
# it with one that downloads nothing, so nothing needs the network then).
_REAL_DOWNLOAD_AND_PREPARE = vars(tfds.core.DatasetBuilder)["download_and_prepare"]


def _tfds_load(
    name: str,
    split: Any,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    download: bool,
    shuffle_seed: int | None,
) -> tuple[tf.data.Dataset, Any]:
    """tfds.load, with a failure to find or prepare the data turned into one clear error.

    Before tfds downloads an unprepared dataset, its download hosts (from the dataset's
    registered checksums) must answer within `_PROBE_TIMEOUT_S`: without network, the run
    stops in seconds with `DatasetUnavailableError` saying how to prepare the data elsewhere,
    instead of tfds's retries going on for minutes without a word.
    """
    try:
        if download:
            _check_can_prepare(name, data_dir=data_dir, manual_dir=manual_dir)
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            with_info=True,
            shuffle_files=shuffle_seed is not None,
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
            decoders={"image": tfds.decode.SkipDecoding()},
            download_and_prepare_kwargs={
                "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
            },
        )
    except DatasetUnavailableError:
        raise
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown dataset {name!r}: {e}") from e
    except ImportError as e:  # tfds imports some of its dependencies only when preparing
        raise _missing_module_error(name, e.name or str(e)) from e
    except Exception as e:
        raise DatasetUnavailableError(
            f"Could not load tfds dataset {name!r} (split {split!r}) from data_dir="
            f"{_tfds_where(data_dir)}: {type(e).__name__}: {e}\n"
            + _tfds_prepare_hint(name, data_dir, manual_dir)
        ) from e


def _check_can_prepare(name: str, *, data_dir: str | None, manual_dir: str | None) -> None:
    """Nothing when `name` is prepared in data_dir or can be prepared now; else a clear error.

    Checks, in this order, what a download needs: its hosts answer (`DatasetUnavailableError`
    naming them), and tfds's undeclared dependencies are installed (`ModuleNotFoundError`).
    """
    builder = tfds.builder(name, data_dir=data_dir)
    prepare = vars(tfds.core.DatasetBuilder)["download_and_prepare"]
    if prepare is not _REAL_DOWNLOAD_AND_PREPARE or builder.is_prepared():
        return
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS is None:  # manual datasets read manual_dir instead
        unreachable = _unreachable(_download_endpoints(builder), _PROBE_TIMEOUT_S)
        if unreachable:
            reasons = "; ".join(f"{host}:{port} ({why})" for (host, port), why in unreachable)
            raise DatasetUnavailableError(
                f"tfds dataset {name!r} is not prepared in data_dir={_tfds_where(data_dir)}, and "
                f"it cannot be downloaded here: no network connection to its download host(s) "
                f"within {_PROBE_TIMEOUT_S:g} s: {reasons}.\n"
                + _tfds_prepare_hint(name, data_dir, manual_dir)
            )
    missing = _tfds_missing_modules()
    if missing:
        raise _missing_module_error(name, missing[0])


def _download_endpoints(builder: Any) -> list[tuple[str, int]]:
    """(host, port) to reach for the URLs of the builder's registered checksums, proxies applied.

    Read from the checksums file next to the builder's code (or tfds's legacy `url_checksums/`
    file) without tfds's `url_infos`, which needs `importlib_resources`. Empty when the dataset
    registers no URLs.
    """
    candidates = [
        os.path.join(os.path.dirname(tfds.__file__), "url_checksums", f"{builder.name}.txt")
    ]
    try:
        code_dir = os.path.dirname(inspect.getfile(type(builder)))
        candidates.insert(0, os.path.join(code_dir, "checksums.tsv"))
    except (TypeError, OSError):  # a builder class defined outside a file
        pass
    urls = []
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            urls = [line.split()[0] for line in lines if line and not line.startswith("#")]
            break
    proxies = urllib.request.getproxies()
    endpoints: list[tuple[str, int]] = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            parts = urllib.parse.urlsplit(proxy if "//" in proxy else f"http://{proxy}")
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
        if parts.hostname and (parts.hostname, port) not in endpoints:
            endpoints.append((parts.hostname, port))
    return endpoints[:_PROBED_HOSTS_MAX]


def _unreachable(
    endpoints: list[tuple[str, int]], timeout: float
) -> list[tuple[tuple[str, int], str]]:
    """The endpoints that do not accept a TCP connection within `timeout` s, with the reason.

    Probed in parallel daemon threads and waited for at most `timeout` s in all, name lookup
    included (a resolver without network can block longer than a socket timeout covers).
    """
    results: dict[tuple[str, int], str | None] = {}

    def probe(endpoint: tuple[str, int]) -> None:
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
        except Exception as e:  # any failure means "not reachable"
            results[endpoint] = f"{type(e).__name__}: {e}"
        else:
            results[endpoint] = None

    threads = [threading.Thread(target=probe, args=(e,), daemon=True) for e in endpoints]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answers = dict(results)  # threads still running may write later
    unreachable = []
    for endpoint in endpoints:
        if endpoint not in answers:
            unreachable.append((endpoint, f"no answer within {timeout:g} s"))
        elif answers[endpoint] is not None:
            unreachable.append((endpoint, answers[endpoint]))
    return unreachable


def _tfds_undeclared_modules() -> list[str]:
    """Modules the installed tfds imports when preparing a dataset without declaring them.

    tensorflow-datasets 4.9.10 imports `importlib_resources` (lazily, in its dataset builder)
    on every Python version, but requires it only for Python < 3.9.
    """
    from tensorflow_datasets.core import dataset_builder

    return [m for m in _TFDS_UNDECLARED if m in vars(dataset_builder)]


def _tfds_missing_modules() -> list[str]:
    """`_tfds_undeclared_modules` that are not installed here."""
    return [m for m in _tfds_undeclared_modules() if importlib.util.find_spec(m) is None]


def _missing_module_error(name: str, module: str) -> ModuleNotFoundError:
    """The error for a module that preparing `name` needs, with the `pip install` that fixes it."""
    why = (
        f", which tensorflow-datasets {tfds.__version__} imports without declaring it"
        if module in _TFDS_UNDECLARED
        else ", which is not installed"
    )
    return ModuleNotFoundError(
        f"Preparing tfds dataset {name!r} needs the Python module {module!r}{why}. Install it "
        f"(`pip install {module}`) and run again.",
        name=module,
    )


def _tfds_where(data_dir: str | None) -> str:
    return data_dir or f"the tfds default ({_TFDS_DEFAULT_DIR} or $TFDS_DATA_DIR)"


def _tfds_prepare_hint(name: str, data_dir: str | None, manual_dir: str | None) -> str:
    """How to prepare `name` offline: build it where there is network, copy the data_dir."""
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    manual = f" --manual_dir={manual_dir}" if manual_dir else ""
    target = data_dir or _TFDS_DEFAULT_DIR
    undeclared = _tfds_undeclared_modules()
    first = f" (after `pip install {' '.join(undeclared)}`)" if undeclared else ""
    return (
        f"Prepare it on a machine with network access: `tfds build {name}{dir_flag}{manual}`"
        f"{first}, then copy that data_dir ({target}) here and point the run at it with "
        "--config.data_dir=<the copied directory>."
    )


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))
