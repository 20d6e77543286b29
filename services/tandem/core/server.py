"""What every Tandem gRPC server shares: health, reflection, and one error mapping."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.core import tls
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

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A peer that restarts (a rescheduled pod, a replaced process) is found again within seconds.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
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


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns Tandem's typed errors into status codes with their message; others into INTERNAL.
    A request that is not a valid message of its RPC is answered INVALID_ARGUMENT."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = _wrap(behavior, kind.startswith("stream_"), kind.endswith("_stream"))
                deserialize = handler.request_deserializer and _lenient(handler.request_deserializer)
                return handler._replace(**{kind: wrapped, "request_deserializer": deserialize})
        return handler


def carries_key(metadata, key: str) -> bool:
    """Whether call metadata holds exactly one `authorization` header, and it is `Bearer <key>`
    (compared in constant time; two headers never pass, whichever of them is right)."""
    sent = [v for k, v in metadata or () if k == "authorization"]
    return bool(key) and len(sent) == 1 and hmac.compare_digest(str(sent[0]).encode(), f"Bearer {key}".encode())


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Every call but health checks and reflection must carry `authorization: Bearer KEY`, KEY
    one of `keys` (the API key, and the admin key, which may do what the API key may)."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, *keys: str):
        self._keys = [k for k in keys if k]

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.OPEN_PREFIXES):
            return handler
        if any(carries_key(handler_call_details.invocation_metadata, key) for key in self._keys):
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong API key: send the metadata 'authorization: Bearer <key>'")

        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        return handler._replace(**{kind: deny})


class Server:
    """A gRPC server with health (liveness "" and readiness per service) and reflection.

    Services start NOT_SERVING; call `set_ready()` once the model or state is ready. With an
    `api_key`, calls other than health and reflection must present it as a bearer token. With
    `credentials` the port serves TLS, requiring a client certificate signed by the cluster's CA
    unless `public`, and health is served, plaintext, on `health_port` too (`health_address`). An
    `admin_key` passes wherever the API key does (the servicer decides what only it may do).
    """

    def __init__(self, host: str, port: int, max_workers: int = 32, api_key: str = "",
                 credentials: tls.Credentials | None = None, public: bool = False, health_port: int = 0,
                 admin_key: str = ""):
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=[*([ApiKeyInterceptor(api_key, admin_key)] if api_key else []), ErrorInterceptor()],
            options=CHANNEL_OPTIONS,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.grpc.add_secure_port(f"{host}:{port}", credentials.server(require_client_auth=not public))
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.health_address = self.address
        self._health_grpc: grpc.Server | None = None
        if credentials is not None:
            self._health_grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
            bound = self._health_grpc.add_insecure_port(f"{host}:{health_port}")
            if bound == 0:
                raise OSError(f"cannot listen on {host}:{health_port} for health")
            self.health_address = f"{host}:{bound}"
        self._service_names: list[str] = []
        self._on_stop: list[Callable[[], None]] = []
        self._on_drain: list[Callable[[float], object]] = []

    def add(self, register: Callable, servicer: object, service_names: Iterable[str]) -> None:
        register(servicer, self.grpc)
        self._service_names.extend(service_names)

    def start(self) -> "Server":
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.grpc)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness
        for name in self._service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc.start()
        if self._health_grpc is not None:
            self._health_grpc.start()
        return self

    def set_ready(self, ready: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._service_names:
            self.health.set(name, status)

    def on_drain(self, callback: Callable[[float], object]) -> None:
        """Run `callback(grace_s)` on `drain()`: refuse new work and wait, at most grace_s, for the held."""
        self._on_drain.append(callback)

    def drain(self, grace_s: float) -> None:
        """Before a stop: report NOT_SERVING (liveness stays SERVING: nothing is wrong, the process is
        leaving) so that no new traffic is routed here, and let the service finish what it holds."""
        import time

        self.set_ready(False)
        deadline = time.monotonic() + grace_s
        for callback in self._on_drain:
            callback(max(0.0, deadline - time.monotonic()))

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run `callback` (the service's own shutdown: threads, outgoing streams) on `stop()`."""
        self._on_stop.append(callback)

    def stop(self, grace_s: float = 1.0) -> None:
        self.set_ready(False)
        for callback in reversed(self._on_stop):
            callback()
        self.grpc.stop(grace_s).wait()
        if self._health_grpc is not None:
            self._health_grpc.stop(0).wait()


def wait_ready(address: str, service: str, timeout_s: float = 60.0,
               credentials: tls.Credentials | None = None) -> None:
    """Block until `service` at `address` reports SERVING, or raise TimeoutError."""
    import time

    deadline = time.monotonic() + timeout_s
    with tls.open_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} at {address} not ready after {timeout_s:.0f}s")
            time.sleep(0.1)
