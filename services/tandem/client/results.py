"""What the client returns: plain frozen dataclasses, free of protobuf types."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its natural-log probability."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class SampleLogprobs:
    """Log probabilities reported for one generated token."""

    sampled: TokenLogprob
    """The sampled token."""
    top: list[TokenLogprob] = field(default_factory=list)
    """The most likely alternatives, most likely first."""


@dataclass(frozen=True)
class Usage:
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""


@dataclass(frozen=True)
class GenerateChunk:
    """Tokens committed since the previous chunk of a stream."""

    token_ids: list[int]
    text: str
    """Text of the new tokens; may be empty while a multi-byte character is incomplete."""
    logprobs: list[SampleLogprobs] | None
    """One entry per new token when logprobs were requested, else None."""
    completion_tokens: int = 0
    """Output tokens generated so far, these included."""


@dataclass(frozen=True)
class GenerateResult:
    """A finished request."""

    request_id: str
    token_ids: list[int]
    """Every generated token id."""
    text: str
    """The whole generated text, stop string excluded."""
    finish_reason: str
    """"length", "stop_token" (EOS or stop_token_ids), "stop" (a stop string), "aborted",
    "time_limit" or "error"."""
    usage: Usage
    logprobs: list[SampleLogprobs] | None
    """One entry per generated token when logprobs were requested, else None."""
    time_to_first_token_s: float
    e2e_latency_s: float
    queue_time_s: float = 0.0


@dataclass(frozen=True)
class StageInfo:
    """One pipeline stage: layers [layer_start, layer_end), served at `address` (empty unless asked
    for with the admin key)."""

    index: int
    address: str
    layer_start: int
    layer_end: int
    kv_blocks_used: int


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler replica, by its index in the coordinator's sampler table, and the sequences it
    holds; `address` is empty unless asked for with the admin key."""

    index: int
    address: str
    num_sequences: int


@dataclass(frozen=True)
class ServerInfo:
    """Model, pipeline, sampler pool, queue and KV cache figures of a deployment."""

    model: str
    version: str
    vocab_size: int
    max_model_len: int
    stages: list[StageInfo]
    samplers: list[SamplerInfo]
    num_requests_running: int
    num_requests_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    kv_store_blocks_used: int
    num_preemptions_total: int
    dtype: str
    device: str
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, found there
