"""Serve the gateway with uvicorn on a thread of its own, as `tandem serve gateway` and the tests do."""

from __future__ import annotations

import os
import socket
import threading
import time

import uvicorn

from tandem.gateway.app import Gateway
from tandem.gateway.config import GatewayConfig


class GatewayServer:
    """A running gateway: `address` (host:port, the port bound even when 0 was asked for), `stop()`."""

    def __init__(self, config: GatewayConfig, start_timeout_s: float = 30.0):
        gateway = Gateway(config, api_key=os.environ.get(config.api_key_env, ""))
        self._socket = socket.create_server((config.host, config.port))
        self.port = self._socket.getsockname()[1]
        self.address = f"{config.host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(gateway.app(), log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the gateway did not start on {self.address}")
            time.sleep(0.01)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving: requests in flight get `grace_s` seconds, then their calls are cancelled."""
        self._server.should_exit = True
        self._thread.join(grace_s + 5.0)
        self._socket.close()


def serve(config: GatewayConfig) -> GatewayServer:
    """Start the gateway; it listens once this returns."""
    return GatewayServer(config)
