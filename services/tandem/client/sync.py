"""TandemClient: the blocking client of a Tandem deployment's public API."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from tandem.client._wire import (
    GenerateOptions,
    StreamState,
    build_generate_request,
    call_metadata,
    generate_metadata,
    open_channel,
    server_info_from,
)
from tandem.client.errors import error_from_rpc
from tandem.client.results import GenerateChunk, GenerateResult, ServerInfo
from tandem.v1 import coordinator_pb2, coordinator_pb2_grpc

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack

Reply = TypeVar("Reply")


class GenerateStream:
    """The chunks of one Generate call, then its `result`.

    Iterate it (`for chunk in stream`) or call `next(stream)`. Leaving a `for` loop early,
    `close()`, leaving a `with` block or dropping the stream cancels the call, and the
    server aborts the request. Errors raise typed `tandem.client.errors.ClientError`s.
    """

    def __init__(self, call: Any, state: StreamState):
        self._call = call  # grpc's iterator over GenerateResponse, also a grpc.Call
        self._state = state
        self._is_done = False

    @property
    def request_id(self) -> str:
        """The request's id: the caller's, or the server's once its first message arrived."""
        return self._state.request_id

    @property
    def result(self) -> GenerateResult | None:
        """The finished request, once the stream has ended; None before, or if cancelled."""
        return self._state.result

    def __iter__(self) -> Iterator[GenerateChunk]:
        try:
            while (chunk := self._next_chunk()) is not None:
                yield chunk
        finally:  # a break, an exception in the loop body, or the generator dropped
            self.close()

    def __next__(self) -> GenerateChunk:
        chunk = self._next_chunk()
        if chunk is None:
            raise StopIteration
        return chunk

    def wait(self) -> GenerateResult:
        """Read the rest of the stream and return the result."""
        for _ in self:
            pass
        return self._state.finish()

    def close(self) -> None:
        """Cancel the call unless it has ended; the server then aborts the request."""
        if not self._is_done:
            self._is_done = True
            self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_call"):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing to report to at collection time
                pass

    def _next_chunk(self) -> GenerateChunk | None:
        while not self._is_done:
            try:
                response = next(self._call)
            except StopIteration:
                self._is_done = True
                self._state.finish()  # raises when the server sent no completion
                return None
            except grpc.RpcError as e:
                if self._is_done:  # cancelled by close() from another thread
                    return None
                self._is_done = True
                raise error_from_rpc(e) from None
            chunk = self._state.on_response(response)
            if chunk is not None:
                return chunk
        return None


class TandemClient:
    """A blocking client of a Tandem coordinator at `endpoint` ("host:port").

    `timeout_s` is the default deadline of every call (None: no deadline); TLS is used when
    `tls` is set or `root_certificates` (PEM) are given; `api_key` is sent as a bearer token.
    Failed calls raise `tandem.client.errors.ClientError` subclasses. Use it as a context
    manager, or call `close()`.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        api_key: str | None = None,
    ):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._metadata = call_metadata(api_key)
        self._channel = open_channel(grpc, endpoint, tls, root_certificates)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def generate(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> GenerateResult:
        """Generate a completion of `prompt` (text) or `prompt_ids=` and return it whole.

        Options are those of `GenerateOptions`: vLLM's sampling parameters (max_tokens,
        temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, seed, stop, stop_token_ids, ignore_eos, min_tokens, logprobs,
        logit_bias), plus add_special_tokens, output_len_hint, request_id and timeout_s. The server
        sends the result alone, not each token as it comes (`stream=True` asks for those too).
        """
        options.setdefault("stream", False)
        with self.generate_stream(prompt, **options) as stream:
            return stream.wait()

    def generate_stream(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> GenerateStream:
        """Start generating, as `generate` does; iterate the stream for chunks as they come (none with
        `stream=False`: the stream then ends with the result alone)."""
        request = build_generate_request(prompt, options)
        call = self._stub.Generate(
            request, timeout=self._timeout(options.get("timeout_s")),
            metadata=generate_metadata(self._metadata, options),
        )
        return GenerateStream(call, StreamState(request))

    def abort(self, request_id: str, reason: str = "") -> None:
        """Abort a running or queued request; NotFoundError for an unknown id."""
        self._unary(self._stub.Abort, coordinator_pb2.AbortRequest(request_id=request_id, reason=reason))

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` under the served model's tokenizer."""
        request = coordinator_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._unary(self._stub.Tokenize, request).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `token_ids` under the served model's tokenizer."""
        request = coordinator_pb2.DetokenizeRequest(
            token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return self._unary(self._stub.Detokenize, request).text

    def server_info(self, *, include_addresses: bool = False) -> ServerInfo:
        """Model, pipeline, sampler pool, queue and KV cache figures. `include_addresses`: also the
        stages' and samplers' host:port, given only to a client whose `api_key` is the admin key
        (PermissionDeniedError otherwise)."""
        request = coordinator_pb2.GetServerInfoRequest(include_addresses=include_addresses)
        return server_info_from(self._unary(self._stub.GetServerInfo, request))

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _unary(self, method: Callable[..., Reply], request: object) -> Reply:
        try:
            return method(request, timeout=self._timeout(None), metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
