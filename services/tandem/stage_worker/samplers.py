"""The sampler replicas a last stage may send logits to: found from its own configuration only.

Plans name each row's sampler by an index into the table the coordinator's plan stream sends;
the stage dials a name from that table only when its own discovery source announced it: the
`samplers` list of its config, or the EndpointSlices of `sampler_service` that the coordinator
follows too (core.discovery), so `kubectl scale` works for both alike. A name the source never
announced is refused, so a plan (whoever sent it) cannot point the stage at another address.

What the source announced once stays known: a replica scaled away may still be named by plans
already in flight, and dialing it fails harmlessly. A name not announced yet is waited for,
`wait_s` at most, since the coordinator may see a new replica a moment before the stage does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from tandem.core.wire.discovery import SamplerDiscovery, StaticDiscovery, from_config
from tandem.stage_worker.config import StageWorkerConfig

log = logging.getLogger(__name__)


class SamplerDirectory:
    """Every sampler address the stage's discovery source announced; `knows` is called by the
    thread that prepares plans, announcements come from the source's thread."""

    def __init__(self, source: SamplerDiscovery, wait_s: float):
        self._source, self.wait_s = source, wait_s
        self._known: set[str] = set()
        self._announced = threading.Condition()

    def start(self) -> None:
        self._source.start(self._announce)

    def stop(self) -> None:
        self._source.stop()

    @property
    def known(self) -> frozenset[str]:
        with self._announced:
            return frozenset(self._known)

    def knows(self, address: str) -> bool:
        """Whether the source announced `address`, waiting up to wait_s for it to."""
        with self._announced:
            return self._announced.wait_for(lambda: address in self._known, timeout=self.wait_s)

    def _announce(self, addresses: Iterable[str]) -> None:
        with self._announced:
            new = set(addresses) - self._known
            if new:
                log.info("samplers this stage may send logits to, added: %s", ", ".join(sorted(new)))
                self._known |= new
                self._announced.notify_all()


def open_directory(config: StageWorkerConfig) -> SamplerDirectory:
    """The directory a last stage's config describes (a static list is never waited for)."""
    source = from_config(config)
    if isinstance(source, StaticDiscovery) and not source.addresses:
        log.warning("this last stage lists no samplers (config field 'samplers'): every plan that samples is refused")
    return SamplerDirectory(source, 0.0 if isinstance(source, StaticDiscovery) else config.sampler_wait_s)
