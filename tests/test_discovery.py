"""Sampler discovery from EndpointSlices, against a local server speaking the list and watch
protocol of the Kubernetes API."""

from __future__ import annotations

import queue
import time

import pytest

from kube_api import FakeKubeApi
from tandem.coordinator.config import CoordinatorConfig
from tandem.core.errors import ConfigError
from tandem.core.wire import discovery
from tandem.core.wire.discovery import EndpointSliceDiscovery, StaticDiscovery, slice_addresses

SERVICE = "tandem-cpu-sampler"


@pytest.fixture
def api():
    server = FakeKubeApi()
    yield server
    server.close()


class Follower:
    """An EndpointSliceDiscovery and the sets it announced."""

    def __init__(self, api: FakeKubeApi, **options):
        self.changes: queue.Queue[frozenset[str]] = queue.Queue()
        self.discovery = EndpointSliceDiscovery(SERVICE, api.namespace, "grpc",
                                                discovery.kubernetes_api_client(api.url), retry_s=0.1, **options)
        self.discovery.start(self.changes.put)

    def expect(self, *addresses: str, timeout_s: float = 10) -> None:
        """The next announcement is exactly `addresses`."""
        try:
            got = self.changes.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no announcement within {timeout_s}s; expected {sorted(addresses)}")
        assert got == frozenset(addresses)

    def stop(self) -> None:
        self.discovery.stop()


@pytest.fixture
def follow(api):
    followers: list[Follower] = []

    def start(**options) -> Follower:
        followers.append(Follower(api, **options))
        return followers[-1]

    yield start
    for f in followers:
        f.stop()


def test_scale_up_down_and_not_ready(api, follow):
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True), ("10.0.0.2", True)], 50052)
    api.set_endpoints("other", "some-other-service", [("10.9.9.9", True)], 50052)
    f = follow()
    f.expect("10.0.0.1:50052", "10.0.0.2:50052")
    # kubectl scale --replicas=3
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True), ("10.0.0.2", True), ("10.0.0.3", True)], 50052)
    f.expect("10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052")
    # a replica fails its readiness probe
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", True)], 50052)
    f.expect("10.0.0.1:50052", "10.0.0.3:50052")
    # kubectl scale --replicas=1
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True)], 50052)
    f.expect("10.0.0.1:50052")
    # a second slice of the same Service adds to the first; deleting it takes its replicas away
    api.set_endpoints("pool-b", SERVICE, [("10.0.1.1", True)], 50052)
    f.expect("10.0.0.1:50052", "10.0.1.1:50052")
    api.delete("pool-b")
    f.expect("10.0.0.1:50052")
    # other Services' slices were never announced, and no change went unannounced or twice
    assert f.changes.empty()
    assert api.lists == 1


def test_a_dropped_watch_resumes_from_the_last_version_seen(api, follow):
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True)], 50052)
    f = follow()
    f.expect("10.0.0.1:50052")
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True), ("10.0.0.2", True)], 50052)
    f.expect("10.0.0.1:50052", "10.0.0.2:50052")
    seen = str(api.version)
    api.drop_watches()
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.2", True)], 50052)  # while the watch is down
    f.expect("10.0.0.2:50052")
    assert api.watches[-1] == seen, api.watches  # resumed where it was, without listing again
    assert api.lists == 1


def test_an_expired_version_lists_again(api, follow):
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True)], 50052)
    f = follow()
    f.expect("10.0.0.1:50052")
    api.compact()  # the server forgets the history the watch would resume from ...
    api.drop_watches()  # ... and the watch must reconnect: 410 Gone, then a fresh list
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True), ("10.0.0.4", True)], 50052)
    f.expect("10.0.0.1:50052", "10.0.0.4:50052")
    deadline = time.monotonic() + 10
    while api.lists < 2:
        assert time.monotonic() < deadline, "the expired watch was not followed by a list"
        time.sleep(0.05)


def test_a_watch_that_times_out_is_renewed(api, follow):
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.1", True)], 50052)
    f = follow(watch_timeout_s=1)
    f.expect("10.0.0.1:50052")
    deadline = time.monotonic() + 10
    while len(api.watches) < 3:
        assert time.monotonic() < deadline, "the watch was not renewed after its timeout"
        time.sleep(0.05)
    api.set_endpoints("pool-a", SERVICE, [("10.0.0.5", True)], 50052)
    f.expect("10.0.0.5:50052")
    assert api.lists == 1


def test_slice_addresses_reads_ready_endpoints_on_the_named_port():
    endpoint_slice = {
        "ports": [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 50052}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"], "conditions": {}},  # unknown readiness counts as ready
            {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
            {"addresses": ["fd00::7"], "conditions": {"ready": True}},
            {"addresses": [], "conditions": {"ready": True}},
        ],
    }
    assert slice_addresses(endpoint_slice, "grpc") == {"10.0.0.1:50052", "10.0.0.2:50052", "[fd00::7]:50052"}
    assert slice_addresses(endpoint_slice, "") == {"10.0.0.1:9090", "10.0.0.2:9090", "[fd00::7]:9090"}
    assert slice_addresses(endpoint_slice, "http") == set()
    assert slice_addresses({"endpoints": [{"addresses": ["10.0.0.1"]}]}, "grpc") == set()


def test_static_discovery_announces_its_list_once():
    got: list[frozenset[str]] = []
    StaticDiscovery(["127.0.0.1:1", "127.0.0.1:2"]).start(got.append)
    assert got == [frozenset({"127.0.0.1:1", "127.0.0.1:2"})]


def test_discovery_config_errors_name_the_field(tmp_path, monkeypatch):
    base = dict(model="m", stages=("s:1",))
    with pytest.raises(ConfigError, match="sampler_discovery"):
        CoordinatorConfig(**base, sampler_discovery="dns").validate()
    with pytest.raises(ConfigError, match="sampler_service"):
        CoordinatorConfig(**base, sampler_discovery="endpointslices").validate()
    with pytest.raises(ConfigError, match="'samplers'"):
        CoordinatorConfig(**base).validate()
    CoordinatorConfig(**base, sampler_discovery="endpointslices", sampler_service=SERVICE).validate()
    monkeypatch.setattr(discovery, "NAMESPACE_FILE", tmp_path / "absent")
    with pytest.raises(ConfigError, match="sampler_namespace"):
        discovery.from_config(CoordinatorConfig(**base, sampler_discovery="endpointslices", sampler_service=SERVICE))
