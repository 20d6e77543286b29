"""AsyncTandemClient: the asyncio client of a Tandem deployment's public API (grpc.aio)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
import grpc.aio

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


class AsyncGenerateStream:
    """The chunks of one Generate call, then its `result`; the asyncio GenerateStream.

    Iterate it with `async for`, or `await anext(stream)`. Leaving the loop early, `close()`,
    leaving an `async with` block or dropping the stream cancels the call, and the server
    aborts the request. Errors raise typed `tandem.client.errors.ClientError`s.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall, state: StreamState):
        self._call = call
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

    async def _chunks(self) -> AsyncIterator[GenerateChunk]:
        try:
            while (chunk := await self._next_chunk()) is not None:
                yield chunk
        finally:  # a break (once the generator is collected), an exception, a task cancel
            self.close()

    def __aiter__(self) -> AsyncIterator[GenerateChunk]:
        return self._chunks()

    async def __anext__(self) -> GenerateChunk:
        chunk = await self._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def wait(self) -> GenerateResult:
        """Read the rest of the stream and return the result."""
        async for _ in self:
            pass
        return self._state.finish()

    def close(self) -> None:
        """Cancel the call unless it has ended; the server then aborts the request."""
        if not self._is_done:
            self._is_done = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_call"):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing to report to at collection time
                pass

    async def _next_chunk(self) -> GenerateChunk | None:
        while not self._is_done:
            try:
                response = await self._call.read()
            except grpc.RpcError as e:
                if self._is_done:  # cancelled by close() from another task
                    return None
                self._is_done = True
                raise error_from_rpc(e) from None
            except asyncio.CancelledError:
                if self._is_done:  # the read was cut short by close()
                    return None
                raise
            if response is grpc.aio.EOF:
                self._is_done = True
                self._state.finish()  # raises when the server sent no completion
                return None
            chunk = self._state.on_response(response)
            if chunk is not None:
                return chunk
        return None


class AsyncTandemClient:
    """An asyncio client of a Tandem coordinator at `endpoint` ("host:port").

    The same API as `TandemClient`, with coroutines and an async iterator. Create it inside
    a running event loop; close it with `await client.close()` or `async with`.
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
        self._channel = open_channel(grpc.aio, endpoint, tls, root_certificates)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def generate(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> GenerateResult:
        """Generate a completion of `prompt` (text) or `prompt_ids=` and return it whole.

        Options are those of `GenerateOptions`, as for `TandemClient.generate`.
        """
        options.setdefault("stream", False)
        async with self.generate_stream(prompt, **options) as stream:
            return await stream.wait()

    def generate_stream(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> AsyncGenerateStream:
        """Start generating, as `generate` does; `async for` over the stream for chunks (none with
        `stream=False`: the stream then ends with the result alone)."""
        request = build_generate_request(prompt, options)
        call = self._stub.Generate(
            request, timeout=self._timeout(options.get("timeout_s")),
            metadata=generate_metadata(self._metadata, options),
        )
        return AsyncGenerateStream(call, StreamState(request))

    async def abort(self, request_id: str, reason: str = "") -> None:
        """Abort a running or queued request; NotFoundError for an unknown id."""
        await self._unary(self._stub.Abort, coordinator_pb2.AbortRequest(request_id=request_id, reason=reason))

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` under the served model's tokenizer."""
        request = coordinator_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self._unary(self._stub.Tokenize, request)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `token_ids` under the served model's tokenizer."""
        request = coordinator_pb2.DetokenizeRequest(
            token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return (await self._unary(self._stub.Detokenize, request)).text

    async def server_info(self, *, include_addresses: bool = False) -> ServerInfo:
        """Model, pipeline, sampler pool, queue and KV cache figures. `include_addresses`: also the
        stages' and samplers' host:port, given only to a client whose `api_key` is the admin key
        (PermissionDeniedError otherwise)."""
        request = coordinator_pb2.GetServerInfoRequest(include_addresses=include_addresses)
        reply = await self._unary(self._stub.GetServerInfo, request)
        return server_info_from(reply)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    async def _unary(self, method: Callable[..., Awaitable[Reply]], request: object) -> Reply:
        try:
            return await method(request, timeout=self._timeout(None), metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
