"""What every Tandem gRPC server shares: health, reflection, ports, drain and stop (the error
mapping and the API key are core/interceptors.py). The internal services serve on a thread pool
(`Server`); the coordinator's public API on asyncio (core/aio_server.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.core.wire import tls
from tandem.core.wire.interceptors import ErrorInterceptor

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A peer that restarts (a rescheduled pod, a replaced process) is found again within seconds.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def listen(server: grpc.Server | grpc.aio.Server, host: str, port: int, credentials: tls.Credentials | None,
           require_client_auth: bool = True) -> int:
    """Bind `server` to host:port, TLS with `credentials`; the port bound, or OSError."""
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials.server(require_client_auth=require_client_auth))
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return bound


class Lifecycle:
    """Readiness per service, drain and stop hooks: what the thread and the asyncio servers share."""

    def __init__(self) -> None:
        self._service_names: list[str] = []
        self._on_stop: list[Callable[[], None]] = []
        self._on_drain: list[Callable[[float], object]] = []

    def set_ready(self, ready: bool = True) -> None:
        raise NotImplementedError

    def on_drain(self, callback: Callable[[float], object]) -> None:
        """Run `callback(grace_s)` on `drain()`: refuse new work and wait, at most grace_s, for the held."""
        self._on_drain.append(callback)

    def drain(self, grace_s: float) -> None:
        """Before a stop: report NOT_SERVING (liveness stays SERVING: nothing is wrong, the process is
        leaving) so that no new traffic is routed here, and let the service finish what it holds."""
        self.set_ready(False)
        deadline = time.monotonic() + grace_s
        for callback in self._on_drain:
            callback(max(0.0, deadline - time.monotonic()))

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run `callback` (the service's own shutdown: threads, outgoing streams) on `stop()`."""
        self._on_stop.append(callback)

    def _run_on_stop(self) -> None:
        self.set_ready(False)
        for callback in reversed(self._on_stop):
            callback()


class Server(Lifecycle):
    """An internal service's gRPC server, on a thread pool, with health (liveness "" and readiness
    per service) and reflection.

    Services start NOT_SERVING; call `set_ready()` once the model or state is ready. With
    `credentials` the port serves mutual TLS (a client certificate signed by the cluster's CA is
    required), and health is served, plaintext, on `health_port` too (`health_address`).
    """

    def __init__(self, host: str, port: int, max_workers: int = 32, credentials: tls.Credentials | None = None,
                 health_port: int = 0):
        super().__init__()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                interceptors=[ErrorInterceptor()], options=CHANNEL_OPTIONS)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.port = listen(self.grpc, host, port, credentials)
        self.address = f"{host}:{self.port}"
        self.health_address = self.address
        self._health_grpc: grpc.Server | None = None
        if credentials is not None:
            self._health_grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
            self.health_address = f"{host}:{listen(self._health_grpc, host, health_port, None)}"

    def add(self, register: Callable, servicer: object, service_names: Iterable[str]) -> None:
        register(servicer, self.grpc)
        self._service_names.extend(service_names)

    def start(self) -> "Server":
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.grpc)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness
        self.set_ready(False)
        self.grpc.start()
        if self._health_grpc is not None:
            self._health_grpc.start()
        return self

    def set_ready(self, ready: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._service_names:
            self.health.set(name, status)

    def stop(self, grace_s: float = 1.0) -> None:
        self._run_on_stop()
        self.grpc.stop(grace_s).wait()
        if self._health_grpc is not None:
            self._health_grpc.stop(0).wait()


def wait_ready(address: str, service: str, timeout_s: float = 60.0,
               credentials: tls.Credentials | None = None) -> None:
    """Block until `service` at `address` reports SERVING, or raise TimeoutError."""
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
