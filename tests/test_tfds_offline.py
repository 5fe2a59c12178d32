"""A tfds dataset that is not prepared, with the network blocked in this process.

Every socket entry point (`socket.socket.connect`, `socket.create_connection`,
`socket.getaddrinfo`) is patched, so these tests behave the same on a machine with network and
one without. The dataset is the registered `mnist` builder, into an empty tmp data_dir: the
first thing its download needs is storage.googleapis.com.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time

import pytest
import tensorflow_datasets as tfds

from vit_jax import input_pipeline as ip
from vit_jax import tfds_source

DATASET = "mnist"
HOST = ("storage.googleapis.com", 443)  # mnist's registered download host
TIME_BOUND_S = 30.0  # without the probe, tfds's retries take minutes
PROXY_VARIABLES = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


def _refuse(*args, **kwargs):
    raise OSError(101, "Network is unreachable (blocked by the test)")


def _block(monkeypatch, replacement) -> None:
    for name in PROXY_VARIABLES:  # direct connections, whatever the machine's setup
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(socket.socket, "connect", replacement)
    monkeypatch.setattr(socket.socket, "connect_ex", replacement)
    monkeypatch.setattr(socket, "create_connection", replacement)
    monkeypatch.setattr(socket, "getaddrinfo", replacement)


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails at once (no route, no DNS)."""
    _block(monkeypatch, _refuse)


@pytest.fixture
def silent_network(monkeypatch):
    """Every connection attempt hangs (a firewall dropping packets), until the test ends."""
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(120)
        raise OSError(110, "Connection timed out (blocked by the test)")

    _block(monkeypatch, hang)
    yield
    release.set()


def _dataset_info(data_dir):
    return ip.get_dataset_info(
        DATASET, train_split="train", test_split="test", data_dir=str(data_dir)
    )


def _assert_one_clear_error(error: BaseException, data_dir) -> str:
    message = str(error)
    assert not isinstance(error, ImportError), message
    assert "No module named" not in message
    assert f"{DATASET!r}" in message and f"data_dir={data_dir}" in message
    assert f"{HOST[0]}:{HOST[1]}" in message  # the host that did not answer
    assert f"tfds build {DATASET} --data_dir={data_dir}" in message  # how to prepare it
    assert "copy that data_dir" in message and "--config.data_dir=" in message
    assert isinstance(error, tfds_source.DatasetUnavailableError)
    assert isinstance(error, FileNotFoundError)  # what callers caught before
    return message


def _time_to_error(tmp_path) -> tuple[OSError, float]:
    """The error `_dataset_info` raises on an unprepared dataset, and how long it took."""
    start = time.monotonic()
    with pytest.raises(OSError) as err:
        _dataset_info(tmp_path)
    return err.value, time.monotonic() - start


def test_unprepared_dataset_without_network_fails_in_seconds(tmp_path, no_network):
    error, elapsed = _time_to_error(tmp_path)
    print(f"time to error, network refused: {elapsed:.2f} s")
    assert elapsed < TIME_BOUND_S
    _assert_one_clear_error(error, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing started: no partial download to clean up


def test_unprepared_dataset_on_a_silent_network_fails_in_seconds(
    tmp_path, silent_network, monkeypatch
):
    # The probe's wait, 10 s in use, shortened: what is tested is that it waits that long and
    # no longer, then says so.
    monkeypatch.setattr(tfds_source, "_PROBE_TIMEOUT_S", 2.0)
    error, elapsed = _time_to_error(tmp_path)
    print(f"time to error, network silent: {elapsed:.2f} s")
    assert elapsed < TIME_BOUND_S
    message = _assert_one_clear_error(error, tmp_path)
    assert f"no answer within {tfds_source._PROBE_TIMEOUT_S:g} s" in message
    assert elapsed >= tfds_source._PROBE_TIMEOUT_S  # the probe waited for the hosts, and no longer


def test_the_training_and_eval_iterators_fail_the_same_way(tmp_path, no_network):
    common = dict(image_size=8, global_batch_size=8, local_device_count=1, data_dir=str(tmp_path))
    with pytest.raises(tfds_source.DatasetUnavailableError, match="tfds build mnist"):
        ip.get_train_iterator(DATASET, "train", seed=0, **common)
    with pytest.raises(tfds_source.DatasetUnavailableError, match="tfds build mnist"):
        ip.get_eval_iterator(DATASET, "test", **common)


def test_missing_importlib_resources_is_one_clear_error(tmp_path, no_network, monkeypatch):
    """tfds 4.9.10 needs importlib_resources to prepare any dataset, and does not declare it."""
    monkeypatch.setattr(
        tfds_source, "_unreachable", lambda endpoints, timeout: []
    )  # "network is up"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tfds_source.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "importlib_resources" else find_spec(name, *a, **k),
    )
    if not tfds_source._tfds_undeclared_modules():
        pytest.skip(f"tensorflow-datasets {tfds.__version__} does not import importlib_resources")
    with pytest.raises(ModuleNotFoundError) as err:
        _dataset_info(tmp_path)
    message = str(err.value)
    assert f"{DATASET!r}" in message and "pip install importlib_resources" in message
    assert err.value.name == "importlib_resources"


def test_download_hosts_come_from_the_registered_checksums(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    builder = tfds.builder(DATASET, data_dir="/nonexistent/tfds")
    assert tfds_source._download_endpoints(builder) == [HOST]
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert tfds_source._download_endpoints(builder) == [
        ("proxy.example", 3128)
    ]  # what a download uses
    monkeypatch.setenv("no_proxy", HOST[0])
    assert tfds_source._download_endpoints(builder) == [HOST]


def test_mocked_tfds_needs_no_network(tmp_path, no_network):
    """tfds.testing.mock_data downloads nothing, so nothing is probed."""
    with tfds.testing.mock_data(num_examples=4):
        info = _dataset_info(tmp_path)
    assert info.num_classes == 10


def test_download_false_is_the_not_prepared_error(tmp_path, no_network):
    with pytest.raises(tfds_source.DatasetUnavailableError) as err:
        ip.get_dataset_info(
            DATASET,
            train_split="train",
            test_split="test",
            data_dir=str(tmp_path),
            download=False,
        )
    message = str(err.value)
    assert f"tfds build {DATASET} --data_dir={tmp_path}" in message
    assert "--config.data_dir=" in message
