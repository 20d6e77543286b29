"""What the front's threads and the engine's loop share, under one lock.

The front asks here whether a request may come in (not draining, no stage down too long, room
in the queue) and reserves its id until it ends; the loop ends ids and, once a turn, publishes
a `Snapshot` of its state, which the front reads for admission, metrics and GetServerInfo.
Everything else the loop holds is its own thread's and needs no lock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from tandem.core.errors import AlreadyExistsError, ResourceExhaustedError, UnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """What the front may read: published by the loop after each turn, never changed."""

    num_running: int = 0
    num_waiting: int = 0  # swapped out included
    num_blocks_used: int = 0
    num_preemptions: int = 0
    samplers: tuple[str, ...] = ()  # the replicas up, by address
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, found there
    unavailable: str = ""  # why new requests are refused (a stage down too long); empty: they are not
    phase: str = ""  # with temporal phases: "prefill" or "decode"; empty: off
    phase_switches: tuple[int, int] = (0, 0)  # with temporal phases: switches to prefill, to decode
    sampler_indices: tuple[int, ...] = ()  # of each replica up, its index in the stages' sampler table
    num_chained_steps: int = 0  # decode chaining: steps sent before the tokens they feed were sampled


class Gate:
    """The engine's front door: `reserve`, `check`, `is_live` and `drain` for the front's threads,
    `end` and `publish` for the loop; at most `max_queue` requests wait."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.snapshot = Snapshot()
        self._lock = threading.Lock()  # guards the three below
        self._draining = False
        self._live_ids: set[str] = set()  # ids submitted and not yet ended
        self._num_unreceived = 0  # requests submitted and not yet taken in by the loop

    # --- the front's side ---------------------------------------------------------------

    def reserve(self, request_id: str) -> None:
        """Let a request in, its id reserved until it ends: a second live request with the same id
        is refused, whichever call comes first."""
        with self._lock:
            self._check(0)
            if request_id in self._live_ids:
                raise AlreadyExistsError(f"request id {request_id!r} is already in use")
            self._live_ids.add(request_id)
            self._num_unreceived += 1

    def check(self, num_preparing: int = 0) -> None:
        """Refuse now what `reserve` would refuse whatever the request (draining, a stage down too
        long, the queue full); `num_preparing` requests the front let in and has not yet
        submitted count as queued."""
        with self._lock:
            self._check(num_preparing)

    def _check(self, num_preparing: int) -> None:  # under self._lock
        if self._draining:
            raise UnavailableError("the coordinator is shutting down; retry on another replica")
        if self.snapshot.unavailable:
            raise UnavailableError(f"{self.snapshot.unavailable}; retry later")
        if self.snapshot.num_waiting + self._num_unreceived + num_preparing >= self.max_queue:
            raise ResourceExhaustedError(f"the queue is full ({self.max_queue} requests waiting); retry later")

    def is_live(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._live_ids

    def drain(self, grace_s: float) -> bool:
        """Refuse new requests (UNAVAILABLE) and wait, at most `grace_s`, for the admitted ones to
        end; whether they all did."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._live_ids:
                    return True
            time.sleep(0.05)
        log.warning("%d requests still running after the %.0f s drain", len(self._live_ids), grace_s)
        return False

    # --- the loop's side ----------------------------------------------------------------

    def end(self, request_id: str) -> None:
        """The request ended: its id is free again."""
        with self._lock:
            self._live_ids.discard(request_id)

    def publish(self, snapshot: Snapshot, num_received: int) -> None:
        """The loop's state after a turn in which it took in `num_received` submitted requests."""
        with self._lock:
            self.snapshot = snapshot
            self._num_unreceived -= num_received
