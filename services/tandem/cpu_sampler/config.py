"""Configuration of a cpu-sampler replica (the `cpu_sampler` block of the YAML config)."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.core.config import doc
from tandem.core.cpus import cpus_field
from tandem.core.errors import ConfigError, ModelLoadError
from tandem.core.metrics import check_metrics_port, metrics_port_field
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.wire.tls import TlsConfig, tls_field

MAX_TOKEN_ID_BOUND = 2**31  # token ids are int32 on the wire


@dataclass(frozen=True)
class SamplerConfig:
    """One sampler replica: where it listens and the bounds it enforces."""

    host: str = doc("Address to listen on.", "127.0.0.1")
    port: int = doc("Port to listen on; 0 picks a free one.", 0)
    metrics_port: int = metrics_port_field()
    tls: TlsConfig = tls_field()
    tracing_endpoint: str = doc(
        "OpenTelemetry: the OTLP gRPC collector this process sends its spans to (host:port, or an https:// "
        "URL); empty: tracing is off (docs/tracing.md).", "")
    max_workers: int = doc(
        "gRPC handler threads; each open stream (Logits, Results) holds one.", 16)
    model: str = doc(
        "Hugging Face model directory (only its config.json is read): the vocabulary is its vocab_size, "
        "read at start-up. A logits frame of any other width is refused.", "")
    vocab_size: int = doc(
        "Vocabulary size of the model, when there is no `model` directory to read it from; 0: the "
        "model's. One of the two must be set; with both, they must agree.", 0)
    max_tokens_limit: int = doc(
        "Largest max_tokens accepted; the coordinator applies the real context-length limit.",
        MAX_TOKEN_ID_BOUND - 1)
    max_queued_batches: int = doc(
        "Sampled batches queued per Results subscriber; one that falls further behind is "
        "dropped with RESOURCE_EXHAUSTED.", 4096)
    fast_sampler: bool = doc(
        "Sample with FastSampler (the same tokens and logprobs as the reference sampler, bit "
        "for bit, many times faster); false uses the straightforward reference sampler.", True)
    max_planned_steps: int = doc(
        "Row plans (structure-aware transmission) kept for steps whose logits have not arrived; the "
        "oldest are dropped beyond this.", 1024)
    plan_wait_s: float = doc(
        "How long a logits frame without row metadata waits for its step's plan; after that its "
        "rows are reported unsampled.", 30.0)
    num_threads: int = doc(
        "Threads FastSampler spreads a frame's rows over (torch ops release the GIL); 1 samples "
        "on the calling thread. Results do not depend on it.", 1)

    torch_threads: int = doc(
        "torch intra-op threads of the replica's process; 0: one per core it may use (`cpus`, else its "
        "affinity, no more than the container's CPU limit). Rows are spread over num_threads instead: "
        "replicas sharing a node with a thread per core each spin against one another.", 1)
    cpus: str = doc(
        "Cores this replica runs on, as Linux writes them (\"0-3,8\"); every thread of the process is "
        "pinned to them at start-up; empty: leave the affinity as it is.", "")

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range field."""
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535]"),
            ("max_workers", self.max_workers >= 2, "must be >= 2 (a Logits and a Results stream)"),
            ("vocab_size", 0 <= self.vocab_size < MAX_TOKEN_ID_BOUND, "must be in [0, 2^31)"),
            ("max_tokens_limit", 1 <= self.max_tokens_limit < MAX_TOKEN_ID_BOUND,
             "must be in [1, 2^31)"),
            ("max_queued_batches", self.max_queued_batches >= 1, "must be >= 1"),
            ("max_planned_steps", self.max_planned_steps >= 1, "must be >= 1"),
            ("plan_wait_s", self.plan_wait_s > 0, "must be > 0"),
            ("num_threads", 1 <= self.num_threads <= 256, "must be in [1, 256]"),
            ("torch_threads", 0 <= self.torch_threads <= 256, "must be in [0, 256]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"config field {name!r}={getattr(self, name)!r} {rule}")
        check_metrics_port(self.metrics_port)
        cpus_field("cpus", self.cpus)
        if not self.model and not self.vocab_size:
            raise ConfigError("config field 'model' (or 'vocab_size') must give the vocabulary: a sampler "
                              "checks every logits frame's width against it")

    def vocabulary(self) -> int:
        """The vocabulary size: `vocab_size`, else the `model`'s config.json's (a ConfigError if unreadable)."""
        if not self.model:
            return self.vocab_size
        try:
            size = ModelConfig.from_dir(self.model).vocab_size
        except (OSError, ModelLoadError) as e:
            raise ConfigError(f"config field 'model'={self.model!r}: cannot read its config.json ({e})") from None
        if self.vocab_size and self.vocab_size != size:
            raise ConfigError(f"config field 'vocab_size'={self.vocab_size} differs from the model's {size}")
        return size
