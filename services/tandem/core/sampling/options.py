"""Sampling parameters as the sampler takes them: resolved from a request's SamplingParams and
validated, with vLLM's names and defaults.

Pure and free of torch, so that the coordinator can check a request's parameters without the
sampler; the sampler itself is `tandem.core.sampling.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.core.errors import InvalidArgumentError
from tandem.v1 import common_pb2

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily, as in vLLM


@dataclass(frozen=True)
class SamplingOptions:
    """Resolved, validated sampling parameters (vLLM names and defaults)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # the client's seed; None when the server picks one
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; 0: only the sampled token's
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    n: int = 1

    @property
    def needs_only_argmax(self) -> bool:
        """Whether a token is the argmax of its logits row as they come (min_tokens aside, which
        masks tokens for a sequence's first outputs): greedy, with no penalty, logit bias or
        logprobs. The coordinator places such requests on the last stage's own sampler; the fast
        sampler takes a short path for them."""
        return (self.temperature < GREEDY_TEMPERATURE and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias and self.logprobs is None)

    @classmethod
    def from_proto(
        cls, params: common_pb2.SamplingParams, vocab_size: int, max_tokens_limit: int
    ) -> SamplingOptions:
        """Resolve defaults and validate; InvalidArgumentError names the bad field and value."""
        def get(name: str, default):  # noqa: ANN001, ANN202 - proto scalar or default
            return getattr(params, name) if params.HasField(name) else default

        temperature = _finite("temperature", get("temperature", 1.0))
        _require(temperature >= 0, "temperature", temperature, "must be >= 0")
        top_p = _finite("top_p", get("top_p", 1.0))
        _require(0 < top_p <= 1, "top_p", top_p, "must be in (0, 1]")
        top_k = get("top_k", -1)
        _require(top_k >= -1, "top_k", top_k, "must be -1 or 0 (no limit) or positive")
        min_p = _finite("min_p", get("min_p", 0.0))
        _require(0 <= min_p <= 1, "min_p", min_p, "must be in [0, 1]")
        repetition = _finite("repetition_penalty", get("repetition_penalty", 1.0))
        _require(repetition > 0, "repetition_penalty", repetition, "must be > 0")
        presence = _finite("presence_penalty", get("presence_penalty", 0.0))
        _require(-2 <= presence <= 2, "presence_penalty", presence, "must be in [-2, 2]")
        frequency = _finite("frequency_penalty", get("frequency_penalty", 0.0))
        _require(-2 <= frequency <= 2, "frequency_penalty", frequency, "must be in [-2, 2]")
        max_tokens = get("max_tokens", max_tokens_limit)
        _require(1 <= max_tokens <= max_tokens_limit, "max_tokens", max_tokens,
                 f"must be in [1, {max_tokens_limit}]")
        min_tokens = get("min_tokens", 0)
        _require(0 <= min_tokens <= max_tokens, "min_tokens", min_tokens,
                 f"must be in [0, max_tokens={max_tokens}]")
        logprobs = get("logprobs", None)
        _require(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs", logprobs,
                 f"must be in [0, {MAX_LOGPROBS}]")
        n = get("n", 1)
        _require(n >= 1, "n", n, "must be 1")
        _require(n == 1, "n", n, "must be 1 (n > 1 is not supported)")
        for i, text in enumerate(params.stop):
            _require(text != "", f"stop[{i}]", text, "must not be empty")
        for i, token_id in enumerate(params.stop_token_ids):
            _require(0 <= token_id < vocab_size, f"stop_token_ids[{i}]", token_id,
                     f"must be a token id in [0, {vocab_size})")
        for token_id, bias in params.logit_bias.items():
            _require(0 <= token_id < vocab_size, "logit_bias key", token_id,
                     f"must be a token id in [0, {vocab_size})")
            _finite(f"logit_bias[{token_id}]", bias)
        return cls(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k if top_k > 0 else None, min_p=min_p, repetition_penalty=repetition,
            presence_penalty=presence, frequency_penalty=frequency, seed=get("seed", None),
            min_tokens=min_tokens, stop=tuple(params.stop),
            stop_token_ids=tuple(params.stop_token_ids), ignore_eos=params.ignore_eos,
            logprobs=logprobs, logit_bias=tuple(sorted(params.logit_bias.items())), n=n,
        )


def _require(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        shown = f"{value:.6g}" if isinstance(value, float) else repr(value)
        raise InvalidArgumentError(f"sampling parameter {field}={shown} {rule}")


def _finite(field: str, value: float) -> float:
    _require(math.isfinite(value), field, value, "must be a finite number")
    return value
