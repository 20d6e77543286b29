"""Prometheus metrics of one service process: its registry, served over HTTP on its own port.

Every service's config has a `metrics_port` (0 picks a free port, METRICS_OFF serves none); the
endpoint answers any path with the text exposition format (prometheus_client's own server). Names
start with `tandem:` and follow vLLM's habits: counters end in `_total`, units are spelled out.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tandem.core.config import doc
from tandem.core.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "tandem:"
METRICS_OFF = -1
# Step and sampling times: from a fraction of a millisecond (a small CPU step) to seconds (a long prefill)
TIME_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def metrics_port_field() -> int:
    """The `metrics_port` field every service config has."""
    return doc(f"port of the Prometheus metrics endpoint (HTTP, on `host`); 0 picks a free one, {METRICS_OFF} serves "
               "none", 0)


def check_metrics_port(port: int) -> None:
    if not METRICS_OFF <= port <= 65535:
        raise ConfigError(f"config field 'metrics_port'={port!r} must be in [0, 65535], or {METRICS_OFF} for none")


class Metrics:
    """A registry of `tandem:` metrics and, once `serve` is called, the HTTP server exposing it.

    One per service process; a service hosted in another's process (the baseline's sampler on
    the last stage) registers its metrics in the host's.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.port = 0  # the port serving the registry; 0 while it is not served
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def counter(self, name: str, text: str, labels: Sequence[str]) -> Counter:
        """A counter exposed as `tandem:{name}_total`."""
        return Counter(PREFIX + name, text, labels, registry=self.registry)

    def gauge(self, name: str, text: str, labels: Sequence[str]) -> Gauge:
        return Gauge(PREFIX + name, text, labels, registry=self.registry)

    def histogram(self, name: str, text: str, labels: Sequence[str],
                  buckets: Sequence[float] = TIME_BUCKETS_S) -> Histogram:
        return Histogram(PREFIX + name, text, labels, registry=self.registry, buckets=buckets)

    def serve(self, host: str, port: int) -> None:
        """Serve the registry on host:port (0: a free port); METRICS_OFF serves nothing."""
        if port == METRICS_OFF:
            return
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics at http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None
            self.port = 0
