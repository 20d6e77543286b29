"""Gateway configuration (the YAML `tandem serve gateway --config` loads)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.core.config import doc
from tandem.core.errors import ConfigError


@dataclass(frozen=True)
class GatewayConfig:
    """Where the OpenAI-compatible HTTP gateway listens, which coordinator it calls, what it accepts."""

    host: str = doc("address to listen on; 0.0.0.0 in a pod", "127.0.0.1")
    port: int = doc("HTTP port to listen on; 0 picks a free one", 8000)
    coordinator: str = doc("host:port of the coordinator's gRPC API", "127.0.0.1:50051")
    coordinator_tls_ca_file: str = doc(
        "PEM certificate of the CA that signed the coordinator's (its tls.cert_file): the gateway then "
        "calls it over TLS; empty: plaintext", "")
    model: str = doc(
        "Hugging Face model directory whose chat_template.jinja or tokenizer_config.json gives the chat "
        "template and its special tokens; empty: /v1/chat/completions needs chat_template", "")
    chat_template: str = doc("file of a Jinja chat template used instead of the model's", "")
    served_model_name: str = doc(
        "model name in /v1/models and the `model` requests must name; empty: the model directory's name, "
        "or 'tandem' without one", "")
    api_key_env: str = doc(
        "environment variable holding the API key: clients must send 'Authorization: Bearer KEY', and "
        "the gateway sends the same key to the coordinator; the variable unset or empty: no key", "TANDEM_API_KEY")
    max_n: int = doc("most choices (`n`) one request may ask for; each is a Generate call", 8)
    max_request_bytes: int = doc("largest request body accepted, in bytes", 16 * 1024 * 1024)
    request_timeout_s: float = doc("deadline of each Generate call in seconds; 0: none", 0.0)

    def validate(self) -> None:
        """Raise ConfigError naming the first field with a bad value."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"config field 'port' must be in [0, 65535], got {self.port}")
        if not self.coordinator:
            raise ConfigError("config field 'coordinator' must be the coordinator's host:port")
        for name in ("max_n", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r} must be >= 1")
        if self.request_timeout_s < 0:
            raise ConfigError(f"config field 'request_timeout_s' must be >= 0, got {self.request_timeout_s}")
