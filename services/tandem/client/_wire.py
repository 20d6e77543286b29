"""What the sync and async clients share: channels, request building, reply conversion.

Private to tandem.client. Only generated protos are imported from the rest of Tandem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, TypedDict

import grpc

from tandem.client.errors import InternalError
from tandem.client.results import (
    GenerateChunk,
    GenerateResult,
    SampleLogprobs,
    SamplerInfo,
    ServerInfo,
    StageInfo,
    TokenLogprob,
    Usage,
)
from tandem.v1 import common_pb2, coordinator_pb2

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of `generate` and `generate_stream`; None means the server default.

    Sampling parameters keep vLLM's names and meanings (see tandem/v1/common.proto).
    """

    prompt_ids: Sequence[int] | None  # the prompt as token ids, instead of text
    max_tokens: int | None
    temperature: float | None  # 0 is greedy
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    stop: str | Sequence[str] | None  # stop strings, excluded from the text
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    min_tokens: int | None
    logprobs: int | None  # top alternatives per token; 0 for the sampled token only
    logit_bias: Mapping[int, float] | None
    add_special_tokens: bool | None  # when tokenizing a text prompt; server default true
    output_len_hint: int | None  # expected output tokens, for the server's temporal scheduling
    stream: bool | None  # tokens as they come (generate_stream's default), or the result alone (generate's)
    request_id: str | None  # unique among live requests; None lets the server choose
    timeout_s: float | None  # deadline of the whole call; None takes the client's
    traceparent: str | None  # W3C trace context, sent as gRPC metadata: the request's trace continues it


_OPTION_NAMES = frozenset(GenerateOptions.__annotations__)
_OPTIONAL_SCALARS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "min_tokens", "logprobs",
)
# FinishReason names are FINISH_REASON_<X>, shown as "<x>"; a stop string is vLLM's "stop".
_FINISH_REASON_NAMES: dict[int, str] = {common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop"}


def open_channel(
    module: ModuleType, endpoint: str, tls: bool, root_certificates: bytes | None
) -> Any:
    """A channel from `module` (grpc or grpc.aio); TLS when `tls` or root certificates are given."""
    if tls or root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return module.secure_channel(endpoint, credentials, options=CHANNEL_OPTIONS)
    return module.insecure_channel(endpoint, options=CHANNEL_OPTIONS)


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Metadata sent with every call: the API key as a bearer token."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def generate_metadata(metadata: tuple[tuple[str, str], ...] | None,
                      options: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """A Generate call's metadata: every call's, plus the `traceparent` option when given."""
    traceparent = options.get("traceparent")
    return (*(metadata or ()), ("traceparent", traceparent)) if traceparent else metadata


def build_generate_request(
    prompt: str | None, options: Mapping[str, Any]
) -> coordinator_pb2.GenerateRequest:
    """The GenerateRequest for a prompt and options; TypeError/ValueError on bad arguments."""
    unknown = sorted(set(options) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"generate() got an unexpected keyword argument {unknown[0]!r}")
    prompt_ids = options.get("prompt_ids")
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("pass exactly one of prompt (text) and prompt_ids (token ids)")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}; use prompt_ids for ids")
    stop = options.get("stop")
    sampling = common_pb2.SamplingParams(
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        stop_token_ids=list(options.get("stop_token_ids") or ()),
        ignore_eos=bool(options.get("ignore_eos", False)),
        logit_bias=dict(options.get("logit_bias") or {}),
        **{name: options[name] for name in _OPTIONAL_SCALARS if options.get(name) is not None},
    )
    request = coordinator_pb2.GenerateRequest(
        request_id=options.get("request_id") or "", sampling=sampling
    )
    if prompt is not None:
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt_ids or ())
    if options.get("add_special_tokens") is not None:
        request.add_special_tokens = bool(options["add_special_tokens"])
    if options.get("output_len_hint") is not None:
        request.output_len_hint = options["output_len_hint"]
    if options.get("stream") is not None:
        request.stream = bool(options["stream"])
    return request


class StreamState:
    """Turns the messages of one Generate stream into chunks and, at the end, a result."""

    def __init__(self, request: coordinator_pb2.GenerateRequest):
        self.request_id = request.request_id
        self._want_logprobs = request.sampling.HasField("logprobs")
        self.result: GenerateResult | None = None

    def on_response(self, response: coordinator_pb2.GenerateResponse) -> GenerateChunk | None:
        """The chunk a message carries; None for the completion (kept in `result`)."""
        if response.request_id:
            self.request_id = response.request_id
        kind = response.WhichOneof("kind")
        if kind == "chunk":
            chunk = response.chunk
            return GenerateChunk(
                token_ids=list(chunk.token_ids),
                text=chunk.text,
                logprobs=self._logprobs(chunk.logprobs),
                completion_tokens=chunk.completion_tokens,
            )
        if kind == "complete":
            self.result = self._result(response.complete)
        return None

    def finish(self) -> GenerateResult:
        """The result, once the stream has ended; an error if no completion came."""
        if self.result is None:
            raise InternalError(
                grpc.StatusCode.UNKNOWN,
                f"Generate stream of request {self.request_id!r} ended without a completion",
            )
        return self.result

    def _result(self, complete: coordinator_pb2.GenerateComplete) -> GenerateResult:
        usage = complete.usage
        return GenerateResult(
            request_id=self.request_id,
            token_ids=list(complete.output_ids),
            text=complete.text,
            finish_reason=finish_reason_name(complete.finish_reason),
            usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
            logprobs=self._logprobs(complete.logprobs),
            time_to_first_token_s=complete.time_to_first_token_s,
            e2e_latency_s=complete.e2e_latency_s,
            queue_time_s=complete.queue_time_s,
        )

    def _logprobs(self, messages: Sequence[common_pb2.SampleLogprobs]) -> list[SampleLogprobs] | None:
        if not self._want_logprobs:
            return None
        return [
            SampleLogprobs(
                sampled=TokenLogprob(m.sampled.token_id, m.sampled.logprob),
                top=[TokenLogprob(t.token_id, t.logprob) for t in m.top],
            )
            for m in messages
        ]


def finish_reason_name(value: int) -> str:
    """"length", "stop_token", "stop", "aborted", "time_limit", "error", or "unspecified"."""
    if value in _FINISH_REASON_NAMES:
        return _FINISH_REASON_NAMES[value]
    try:
        name = common_pb2.FinishReason.Name(value)
    except ValueError:  # a reason newer than this client
        return f"unknown_{value}"
    return name.removeprefix("FINISH_REASON_").lower()


def server_info_from(reply: coordinator_pb2.GetServerInfoResponse) -> ServerInfo:
    """The ServerInfo of a GetServerInfo reply."""
    scalars = {
        name: getattr(reply, name)
        for name in ServerInfo.__dataclass_fields__
        if name not in ("stages", "samplers")
    }
    return ServerInfo(
        stages=[
            StageInfo(s.index, s.address, s.layer_start, s.layer_end, s.kv_blocks_used)
            for s in reply.stages
        ],
        samplers=[SamplerInfo(s.index, s.address, s.num_sequences) for s in reply.samplers],
        **scalars,
    )
