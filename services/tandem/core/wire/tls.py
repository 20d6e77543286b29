"""Mutual TLS between Tandem's services, one shape for all of them.

Every service's config carries a `tls` block of PEM paths. All empty: plaintext. Set: the
service's internal port admits only callers whose certificate the cluster's CA signed, every
channel it opens to another service presents its own certificate, and health moves to a
plaintext port of its own (kubelet's gRPC probes carry no certificate). The coordinator's
public port serves TLS with the same certificate but asks clients for none: the API key is
their authentication.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tandem.core.config import doc
from tandem.core.errors import ConfigError


@dataclass(frozen=True)
class TlsConfig:
    """The service's certificate, its key, and the cluster's CA (PEM files; all empty: plaintext)."""

    cert_file: str = doc("PEM certificate this service presents, signed by ca_file's CA; empty: plaintext.", "")
    key_file: str = doc("PEM private key of cert_file.", "")
    ca_file: str = doc("PEM certificate of the cluster's CA: peers whose certificate it did not sign are refused.", "")
    server_name: str = doc("Name checked against every peer's certificate instead of the host dialed "
                           "(pod IPs are in no certificate); empty: the host dialed.", "")
    health_port: int = doc("With TLS on: the plaintext port serving only health, for kubelet's probes; "
                           "0 picks a free one.", 0)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.key_file or self.ca_file)

    def validate(self) -> None:
        """Raise ConfigError naming the missing field of a partial set, or a bad health_port."""
        if self.enabled:
            for name in ("cert_file", "key_file", "ca_file"):
                if not getattr(self, name):
                    raise ConfigError(f"config field 'tls.{name}' must be set: TLS needs cert_file, key_file "
                                      "and ca_file together (all empty: plaintext)")
        if not 0 <= self.health_port <= 65535:
            raise ConfigError(f"config field 'tls.health_port' must be in [0, 65535], got {self.health_port}")


def tls_field() -> Any:
    """The `tls` field of a service's config."""
    return doc("Mutual TLS between services (see tandem.core.wire.tls); all empty: plaintext.", default_factory=TlsConfig)


@dataclass(frozen=True)
class Credentials:
    """The PEM bytes of a TlsConfig, read once at start-up."""

    ca: bytes
    key: bytes
    cert: bytes
    server_name: str = ""

    @classmethod
    def load(cls, config: TlsConfig) -> Credentials | None:
        """None when TLS is off; a ConfigError naming the field whose file cannot be read."""
        if not config.enabled:
            return None
        pems = {}
        for name in ("ca_file", "key_file", "cert_file"):
            try:
                pems[name] = Path(getattr(config, name)).read_bytes()
            except OSError as e:
                raise ConfigError(f"config field 'tls.{name}': cannot read {getattr(config, name)} ({e})") from None
        return cls(pems["ca_file"], pems["key_file"], pems["cert_file"], config.server_name)

    def server(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """An internal port (client certificates required) or the public one (none asked for)."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_auth)

    def channel(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def open_channel(address: str, credentials: Credentials | None,
                 options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A channel to another service: mutual TLS with `credentials`, plaintext without."""
    options = list(options or [])
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    if credentials.server_name:
        options.append(("grpc.ssl_target_name_override", credentials.server_name))
    return grpc.secure_channel(address, credentials.channel(), options=options)
