"""Long-lived outgoing gRPC streams fed from a queue, reopened when they break."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)
_END = object()
# How long a stage waits for a stream's thread to take what it handed over (activations, tokens).
# Without the wait, the handing thread goes straight on to its next step and the stream's thread, on
# the same core, gets the frame only when the scheduler preempts it: measured 3-5 ms later on this
# project's 2-core machine, all of it on the pipeline's critical path. What the stream cannot take
# that soon (its peer is slow or gone) is sent when it can.
HANDOFF_WAIT_S = 0.01


class StreamSender:
    """Sends messages over a client-streaming call in a background thread.

    `open_call` takes a request iterator and makes the call (it blocks until the stream ends).
    If the stream breaks, or the peer ends it before `close`, `on_break` hears why, and the next
    `send` opens a new one; messages sent into a broken stream are lost, and whoever waits for
    their effect must time out and retry.
    """

    def __init__(self, open_call: Callable[[Iterator[Any]], Any], name: str,
                 on_break: Callable[[str], None] | None = None):
        self._open_call, self.name, self._on_break = open_call, name, on_break
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.num_sent = 0

    def send(self, message: Any) -> None:
        """Queue a message; after `close` it is dropped (the owner is shutting down: its channel may be closed)."""
        with self._lock:
            if self._closed:
                return
            if self._thread is None or not self._thread.is_alive():
                self._queue = queue.Queue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,), name=self.name, daemon=True)
                self._thread.start()
            self._queue.put(message)
            self.num_sent += 1

    def _run(self, q: queue.Queue) -> None:
        try:
            self._open_call(iter(q.get, _END))
            reason = "the peer ended the stream"
        except grpc.RpcError as e:
            log.warning("stream %s ended: %s %s", self.name, e.code(), e.details())
            reason = f"{e.code().name}: {e.details()}"
        if self._on_break is not None and not self._closed:
            self._on_break(reason)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._queue is not None:
                self._queue.put(_END)
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
