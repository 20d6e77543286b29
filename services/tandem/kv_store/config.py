"""Configuration of the kv-store service (the `kv_store` block of the YAML the chart mounts)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.core.config import doc
from tandem.core.errors import ConfigError
from tandem.core.metrics import check_metrics_port, metrics_port_field
from tandem.core.wire.tls import TlsConfig, tls_field


@dataclass(frozen=True)
class KvStoreConfig:
    """Where the kv-store listens and how much host memory it may hold."""

    host: str = doc("Address to listen on; 0.0.0.0 in a pod.", "127.0.0.1")
    port: int = doc("Port to listen on; 0 picks a free one.", 0)
    capacity_bytes: int = doc("Most bytes of KV blocks held at once.", 4 * 1024**3)
    max_workers: int = doc("Threads serving RPCs.", 16)
    metrics_port: int = metrics_port_field()
    tls: TlsConfig = tls_field()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field with a bad value."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"config field 'port' must be in [0, 65535], got {self.port}")
        if self.capacity_bytes < 0:
            raise ConfigError(f"config field 'capacity_bytes' must be >= 0, got {self.capacity_bytes}")
        if self.max_workers < 1:
            raise ConfigError(f"config field 'max_workers' must be >= 1, got {self.max_workers}")
        check_metrics_port(self.metrics_port)
