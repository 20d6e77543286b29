"""Where sampler replicas are found: by the coordinator (which places sequences on them) and,
from its own configuration, by the last stage (which sends them logits).

A discovery source calls `on_change(addresses)` with the full set of ready replicas each time
it changes. Locally the set is a static list; in a cluster it follows the EndpointSlices of
the sampler Service, so `kubectl scale` adds and removes replicas. The coordinator's engine
treats both alike: a new address gets new sequences, a vanished one has its sequences moved.
A last stage dials only replicas its own source announced (stage_worker/samplers.py).

Both configs carry the same fields (samplers, sampler_discovery, sampler_service,
sampler_namespace, sampler_port_name, kubernetes_api); `check_config` and `from_config`
read them from either.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from tandem.core.errors import ConfigError

log = logging.getLogger(__name__)

OnChange = Callable[[frozenset[str]], None]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HTTP_GONE = 410


class SamplerDiscovery(Protocol):
    def start(self, on_change: OnChange) -> None: ...

    def stop(self) -> None: ...


class StaticDiscovery:
    """A fixed list of replicas, announced once."""

    def __init__(self, addresses: Iterable[str]):
        self.addresses = frozenset(addresses)

    def start(self, on_change: OnChange) -> None:
        on_change(self.addresses)

    def stop(self) -> None:
        pass


def slice_addresses(endpoint_slice: dict, port_name: str) -> set[str]:
    """host:port of the ready endpoints of one EndpointSlice (a dict as the API returns it).

    `ready` unset counts as ready, as the EndpointSlice API asks consumers to read it; a
    slice without the named port contributes nothing.
    """
    ports = [p for p in endpoint_slice.get("ports") or [] if not port_name or p.get("name") == port_name]
    if not ports or ports[0].get("port") is None:
        return set()
    port = ports[0]["port"]
    found = set()
    for endpoint in endpoint_slice.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False or not endpoint.get("addresses"):
            continue
        host = endpoint["addresses"][0]
        found.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return found


class EndpointSliceDiscovery:
    """Follows the EndpointSlices of one Service: list, then watch from the list's version.

    A watch that ends or drops resumes from the last resourceVersion seen; one the server no
    longer has (410 Gone) is replaced by a fresh list. Errors back off `retry_s` and retry
    forever: discovery outliving a brief API outage is the point.
    """

    def __init__(self, service: str, namespace: str, port_name: str, api_client, *,
                 watch_timeout_s: int = 240, retry_s: float = 1.0):
        from kubernetes import client  # imported here: only cluster deployments need it

        self.service, self.namespace, self.port_name = service, namespace, port_name
        self.api = client.DiscoveryV1Api(api_client)
        self.watch_timeout_s, self.retry_s = watch_timeout_s, retry_s
        self._slices: dict[str, set[str]] = {}
        self.version: str | None = None  # the last resourceVersion seen; None: list first
        self._announced: frozenset[str] | None = None
        self._stopping = threading.Event()
        self._watch: Any = None  # a kubernetes.watch.Watch while following
        self._thread: threading.Thread | None = None
        self._on_change: OnChange = lambda _: None

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="sampler-discovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()

    @property
    def _selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self.service}"

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self._stopping.is_set():
            try:
                if self.version is None:
                    self._list()
                self._follow()
            except ApiException as e:
                if e.status == HTTP_GONE:
                    log.info("EndpointSlice watch expired; listing again")
                    self.version = None
                    continue
                log.warning("EndpointSlices of %s/%s: %s %s", self.namespace, self.service, e.status, e.reason)
                self._stopping.wait(self.retry_s)
            except Exception as e:  # noqa: BLE001 - a dropped connection, a refused one: retry
                log.warning("EndpointSlices of %s/%s: %s", self.namespace, self.service, e)
                self._stopping.wait(self.retry_s)

    def _list(self) -> None:
        response: Any = self.api.list_namespaced_endpoint_slice(  # raw: _preload_content=False
            self.namespace, label_selector=self._selector, _preload_content=False, _request_timeout=30)
        listing = json.loads(response.data)
        self._slices = {s["metadata"]["name"]: slice_addresses(s, self.port_name) for s in listing.get("items") or []}
        self.version = listing["metadata"]["resourceVersion"]
        self._announce()

    def _follow(self) -> None:
        """Apply watch events from self.version on until the watch ends or drops."""
        from kubernetes import watch

        self._watch = watch.Watch()
        stream = self._watch.stream(
            self.api.list_namespaced_endpoint_slice, self.namespace, label_selector=self._selector,
            resource_version=self.version, allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
            _request_timeout=self.watch_timeout_s + 30)
        for event in stream:
            obj = event["raw_object"]
            name = obj["metadata"].get("name", "")
            if event["type"] in ("ADDED", "MODIFIED"):
                self._slices[name] = slice_addresses(obj, self.port_name)
            elif event["type"] == "DELETED":
                self._slices.pop(name, None)
            self.version = obj["metadata"]["resourceVersion"]
            self._announce()
            if self._stopping.is_set():
                break

    def _announce(self) -> None:
        addresses = frozenset().union(*self._slices.values())
        if addresses != self._announced:
            log.info("sampler replicas: %s", ", ".join(sorted(addresses)) or "none")
            self._announced = addresses
            self._on_change(addresses)


def kubernetes_api_client(url: str):
    """An API client for `url`, or for the pod's service account when `url` is empty."""
    from kubernetes import client, config

    if not url:
        config.load_incluster_config()
        return client.ApiClient()
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


def check_config(cfg) -> None:
    """ConfigError naming the field when a config's sampler source is incomplete."""
    if cfg.sampler_discovery not in ("static", "endpointslices"):
        raise ConfigError(f"config field 'sampler_discovery'={cfg.sampler_discovery!r} must be static or endpointslices")
    if cfg.sampler_discovery == "static" and not cfg.samplers:
        raise ConfigError("config field 'samplers' must list at least one sampler (sampler_discovery: static)")
    if cfg.sampler_discovery == "endpointslices" and not cfg.sampler_service:
        raise ConfigError("config field 'sampler_service' must name the sampler Service (sampler_discovery: endpointslices)")


def from_config(cfg) -> SamplerDiscovery:
    """The discovery source a CoordinatorConfig or StageWorkerConfig asks for."""
    if cfg.sampler_discovery == "static":
        return StaticDiscovery(cfg.samplers)
    namespace = cfg.sampler_namespace
    if not namespace:
        if not NAMESPACE_FILE.exists():
            raise ConfigError("config field 'sampler_namespace' is empty and this is not a pod "
                              f"({NAMESPACE_FILE} is missing); name the sampler Service's namespace")
        namespace = NAMESPACE_FILE.read_text().strip()
    return EndpointSliceDiscovery(cfg.sampler_service, namespace, cfg.sampler_port_name,
                                  kubernetes_api_client(cfg.kubernetes_api))
