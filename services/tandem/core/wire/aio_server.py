"""The public API's server: grpc.aio on an asyncio loop in a thread of its own.

A call is a coroutine on that loop, not a thread: a stream waiting for its next tokens holds
nothing but its coroutine, so thousands can be open at once and none takes capacity from the
others. Blocking work a handler hands off (`asyncio.to_thread`) runs on the loop's default
executor, `max_workers` threads. Health, reflection, the API key, TLS with its plaintext health
port, readiness, drain and stop are as on the internal services' `Server` (core/server.py); its
methods are called from any thread but the loop's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent import futures
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.core.wire import tls
from tandem.core.wire.interceptors import ApiKeyInterceptor, AsyncErrorInterceptor
from tandem.core.wire.server import CHANNEL_OPTIONS, Lifecycle, listen

T = TypeVar("T")


class AsyncServer(Lifecycle):
    """Serves coroutine servicers (`async def` methods, async generators for streams).

    With an `api_key`, calls other than health and reflection must present it as a bearer token.
    With `credentials` the port serves TLS without asking clients for certificates, and health
    is served, plaintext, on `health_port` too (`health_address`). An `admin_key` passes wherever
    the API key does (the servicer decides what only it may do).
    """

    def __init__(self, host: str, port: int, max_workers: int = 8, api_key: str = "",
                 credentials: tls.Credentials | None = None, health_port: int = 0, admin_key: str = ""):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="front"))
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self._health_grpc: grpc.aio.Server | None = None
        try:
            self.port = self._run(self._listen(host, port, (api_key, admin_key) if api_key else (), credentials))
            self.health_address = self.address = f"{host}:{self.port}"
            if credentials is not None:
                self.health_address = f"{host}:{self._run(self._listen_health(host, health_port))}"
        except BaseException:
            self._close_loop()
            raise

    def add(self, register: Callable, servicer: object, service_names: Iterable[str]) -> None:
        register(servicer, self.grpc)
        self._service_names.extend(service_names)

    def start(self) -> AsyncServer:
        self._run(self._start())
        return self

    def set_ready(self, ready: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        self._run(self._set_health(self._service_names, status))

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop hooks first, then the server: calls still open after `grace_s` are cancelled."""
        if self.loop.is_closed():
            return
        self._run_on_stop()
        self._run(self.grpc.stop(grace_s))
        if self._health_grpc is not None:
            self._run(self._health_grpc.stop(0))
        self._run(self.loop.shutdown_default_executor())
        self._close_loop()

    # --- on the loop ----------------------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _listen(self, host: str, port: int, keys: tuple[str, ...], credentials: tls.Credentials | None) -> int:
        interceptors = [*([ApiKeyInterceptor(*keys)] if keys else []), AsyncErrorInterceptor()]
        self.grpc = grpc.aio.server(interceptors=interceptors, options=CHANNEL_OPTIONS)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        return listen(self.grpc, host, port, credentials, require_client_auth=False)

    async def _listen_health(self, host: str, port: int) -> int:
        self._health_grpc = grpc.aio.server(interceptors=[AsyncErrorInterceptor()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        return listen(self._health_grpc, host, port, None)

    async def _start(self) -> None:
        names = [*self._service_names, reflection.SERVICE_NAME, health.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.grpc)
        await self._set_health([""], health_pb2.HealthCheckResponse.SERVING)  # liveness
        await self._set_health(self._service_names, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self._health_grpc is not None:
            await self._health_grpc.start()

    async def _set_health(self, names: Iterable[str], status: int) -> None:
        for name in names:
            await self.health.set(name, status)

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
