"""Decode chaining on the stages: the tokens the last stage samples, straight to stage 0.

A decode step's next step needs only the tokens just sampled. The last stage, which samples
argmax-only rows in-process, publishes them per step (`TokenFeed`) to every follower of its
Tokens stream; stage 0 follows that stream (stage_worker.peers) and keeps what arrives
(`TokenBook`) until the step whose plan names that step in `input_step_id` takes it. So a
chained step starts as soon as its tokens exist, without a round trip through the coordinator,
whose plan for it was sent a step ahead. gRPC-free: the stream is stage_worker.servicer's.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence

from tandem.core.wire.streams import HANDOFF_WAIT_S
from tandem.v1 import stage_worker_pb2 as pb

MAX_QUEUED = 1024  # steps a follower may fall behind before it is dropped (it subscribes again)
REPLAY_STEPS = 64  # recent steps a new follower gets first
BOOK_STEPS = 256  # steps of tokens stage 0 keeps; a chained step names one of the last few


class Follower:
    """One Tokens stream: a bounded queue of (message, set when taken); None in it ends the stream."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[pb.SampledTokens, threading.Event] | None] = queue.Queue(MAX_QUEUED)

    def close(self) -> None:
        _put(self.queue, None)

    def messages(self) -> Iterator[pb.SampledTokens]:
        """The empty message that confirms the subscription, then every step published to it."""
        yield pb.SampledTokens(step_id=0)
        while (item := self.queue.get()) is not None:
            item[1].set()
            yield item[0]


class TokenFeed:
    """The last stage's followers; `publish` hands a step's tokens to each. A new follower gets the
    last REPLAY_STEPS steps first: stage 0 following again (it or this stage restarted, or the
    stream broke) misses none that a chained step may still wait for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._followers: set[Follower] = set()
        self._recent: deque[pb.SampledTokens] = deque(maxlen=REPLAY_STEPS)

    def __len__(self) -> int:
        return len(self._followers)

    def subscribe(self) -> Follower:
        follower = Follower()
        with self._lock:
            for message in self._recent:
                follower.queue.put_nowait((message, threading.Event()))
            self._followers.add(follower)
        return follower

    def unsubscribe(self, follower: Follower) -> None:
        with self._lock:
            self._followers.discard(follower)

    def publish(self, step_id: int, request_ids: Sequence[str], token_ids: Sequence[int]) -> None:
        message = pb.SampledTokens(step_id=step_id, request_ids=request_ids, token_ids=token_ids)
        with self._lock:
            self._recent.append(message)
            followers = list(self._followers)
        if not followers:
            return
        taken = threading.Event()
        for follower in followers:
            if not _put(follower.queue, (message, taken)):  # fell behind: its stream ends; stage 0 follows again
                self.unsubscribe(follower)
                follower.queue.get_nowait()  # room for the end
                follower.close()
        taken.wait(HANDOFF_WAIT_S)  # the stream's thread sends it now, not when the next step lets it


def _put(q: queue.Queue, item: object) -> bool:
    try:
        q.put_nowait(item)
    except queue.Full:
        return False
    return True


class TokenBook:
    """Stage 0's tokens by step: request id -> token, for the last BOOK_STEPS steps that came."""

    def __init__(self) -> None:
        self._steps: dict[int, dict[str, int]] = {}

    def put(self, step_id: int, request_ids: Sequence[str], token_ids: Sequence[int]) -> None:
        self._steps[step_id] = dict(zip(request_ids, token_ids))
        while len(self._steps) > BOOK_STEPS:
            del self._steps[next(iter(self._steps))]

    def get(self, step_id: int) -> dict[str, int] | None:
        return self._steps.get(step_id)
