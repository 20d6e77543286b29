"""What every Tandem gRPC server shares: health, reflection, and one error mapping."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.core.errors import (
    AlreadyExistsError,
    CodecError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
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


def _wrap(behavior: Callable, streaming_response: bool) -> Callable:
    def abort(context: grpc.ServicerContext, error: Exception):
        code = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error")
        context.abort(code, str(error) or type(error).__name__)

    if streaming_response:

        def stream(request, context):
            try:
                yield from behavior(request, context)
            except Exception as e:  # noqa: BLE001 - mapped to a status
                if isinstance(e, grpc.RpcError) or context.code() is not None:
                    raise
                abort(context, e)

        return stream

    def unary(request, context):
        try:
            return behavior(request, context)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise
            abort(context, e)

    return unary


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns Tandem's typed errors into status codes with their message; others into INTERNAL."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = _wrap(behavior, kind.endswith("_stream"))
                return handler._replace(**{kind: wrapped})
        return handler


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Every call but health checks and reflection must carry `authorization: Bearer KEY`."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.OPEN_PREFIXES):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong API key: send the metadata 'authorization: Bearer <key>'")

        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        return handler._replace(**{kind: deny})


class Server:
    """A gRPC server with health (liveness "" and readiness per service) and reflection.

    Services start NOT_SERVING; call `set_ready()` once the model or state is ready. With an
    `api_key`, calls other than health and reflection must present it as a bearer token.
    """

    def __init__(self, host: str, port: int, max_workers: int = 32, api_key: str = ""):
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=[*([ApiKeyInterceptor(api_key)] if api_key else []), ErrorInterceptor()],
            options=CHANNEL_OPTIONS,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.address = f"{host}:{self.port}"
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


def wait_ready(address: str, service: str, timeout_s: float = 60.0) -> None:
    """Block until `service` at `address` reports SERVING, or raise TimeoutError."""
    import time

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
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
