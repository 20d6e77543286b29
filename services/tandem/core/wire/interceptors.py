"""One error mapping for every Tandem gRPC server, thread-pool or asyncio: typed errors to status
codes, bytes that are not the RPC's message to INVALID_ARGUMENT, and the API key check."""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import grpc
import grpc.aio

from tandem.core.errors import (
    AlreadyExistsError,
    CodecError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TandemError,
    UnavailableError,
)

log = logging.getLogger(__name__)

STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (TandemError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_of(error: Exception) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


class _Malformed:
    """What bytes that are not the RPC's request message deserialize to (see _lenient)."""

    def __init__(self, error: Exception):
        self.message = f"the request is not a valid protobuf message of its RPC: {error}"


def _lenient(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """`deserialize`, returning a _Malformed instead of raising. On a failure gRPC would answer
    INTERNAL itself, and on a stream its status races the handler's (a server then cannot stop)."""

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's
            return _Malformed(e)

    return parse


class _Call:
    """The context a servicer sees: the call's own, except that a malformed request in a stream
    raises InvalidArgumentError in whichever thread reads it and makes the call inactive, so that a
    handler which reads its stream on another thread and waits on `is_active()` ends too."""

    def __init__(self, context: grpc.ServicerContext):
        self._context = context
        self.malformed: _Malformed | None = None

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    def is_active(self) -> bool:
        return self.malformed is None and self._context.is_active()

    def requests(self, iterator: Iterable) -> Iterator:
        for request in iterator:
            if isinstance(request, _Malformed):
                self.malformed = request
                raise InvalidArgumentError(request.message)
            yield request

    def check(self) -> None:
        if self.malformed is not None:
            raise InvalidArgumentError(self.malformed.message)


def _wrap(behavior: Callable, streaming_request: bool, streaming_response: bool) -> Callable:
    def abort(context: grpc.ServicerContext, error: Exception):
        code = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error")
        context.abort(code, str(error) or type(error).__name__)

    def start(request, context: grpc.ServicerContext) -> tuple[object, _Call]:
        call = _Call(context)
        if streaming_request:
            return call.requests(request), call
        if isinstance(request, _Malformed):
            raise InvalidArgumentError(request.message)
        return request, call

    if streaming_response:

        def stream(request, context):
            try:
                request, call = start(request, context)
                yield from behavior(request, call)
                call.check()  # the handler may have read the malformed request on a thread of its own
            except Exception as e:  # noqa: BLE001 - mapped to a status
                if isinstance(e, grpc.RpcError) or context.code() is not None:
                    raise
                abort(context, e)

        return stream

    def unary(request, context):
        try:
            request, call = start(request, context)
            response = behavior(request, call)
            call.check()
            return response
        except Exception as e:  # noqa: BLE001 - mapped to a status
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise
            abort(context, e)

    return unary


KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def rewrap(handler: grpc.RpcMethodHandler | None, wrap: Callable) -> grpc.RpcMethodHandler | None:
    """`handler` with its behavior replaced by `wrap(behavior, streaming_request, streaming_response)`
    and a deserializer that hands bytes which are not the RPC's message on as a _Malformed."""
    if handler is None:
        return None
    for kind in KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            wrapped = wrap(behavior, kind.startswith("stream_"), kind.endswith("_stream"))
            deserialize = handler.request_deserializer and _lenient(handler.request_deserializer)
            return handler._replace(**{kind: wrapped, "request_deserializer": deserialize})
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns Tandem's typed errors into status codes with their message; others into INTERNAL.
    A request that is not a valid message of its RPC is answered INVALID_ARGUMENT."""

    def intercept_service(self, continuation, handler_call_details):
        return rewrap(continuation(handler_call_details), _wrap)


# --- the same on grpc.aio: behaviors are coroutines or async generators ------------------------


async def _checked(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        if isinstance(request, _Malformed):
            raise InvalidArgumentError(request.message)
        yield request


def _wrap_async(behavior: Callable, streaming_request: bool, streaming_response: bool) -> Callable:
    async def abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
        code = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error")
        await context.abort(code, str(error) or type(error).__name__)

    def start(request):
        if streaming_request:
            return _checked(request)
        if isinstance(request, _Malformed):
            raise InvalidArgumentError(request.message)
        return request

    if streaming_response and inspect.isasyncgenfunction(behavior):

        async def stream(request, context):
            try:
                async for response in behavior(start(request), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status
                await abort(context, e)

        return stream

    async def call(request, context):  # a unary answer, or a stream written with context.write
        try:
            return await behavior(start(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort(context, e)

    return call


class AsyncErrorInterceptor(grpc.aio.ServerInterceptor):
    """ErrorInterceptor for grpc.aio servers: every behavior must be a coroutine or an async generator.
    A method's handler is wrapped once, not on every call (the loop serving every call pays for it)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: nothing is kept for names a client makes up
            return None
        cached = self._wrapped.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[handler_call_details.method] = (handler, rewrap(handler, _wrap_async))
        return cached[1]


def carries_key(metadata, key: str) -> bool:
    """Whether call metadata holds exactly one `authorization` header, and it is `Bearer <key>`
    (compared in constant time; two headers never pass, whichever of them is right)."""
    sent = [v for k, v in metadata or () if k == "authorization"]
    return bool(key) and len(sent) == 1 and hmac.compare_digest(str(sent[0]).encode(), f"Bearer {key}".encode())


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The public API's (asyncio): every call but health checks and reflection must carry
    `authorization: Bearer KEY`, once, KEY one of `keys` (the API key, and the admin key, which
    may do what the API key may)."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
    REFUSAL = "missing or wrong API key: send the metadata 'authorization: Bearer <key>'"

    def __init__(self, *keys: str):
        self._keys = [k for k in keys if k]

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._admits(handler_call_details):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.REFUSAL)

        return handler._replace(**{next(k for k in KINDS if getattr(handler, k)): deny})

    def _admits(self, handler_call_details: grpc.HandlerCallDetails) -> bool:
        if handler_call_details.method.startswith(self.OPEN_PREFIXES):
            return True
        return any(carries_key(handler_call_details.invocation_metadata, key) for key in self._keys)
