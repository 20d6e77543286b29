"""What passes between a sampler's streams: plans waiting for their logits, batches waiting for
their Results subscribers. gRPC-free."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

from tandem.core.errors import ResourceExhaustedError
from tandem.v1 import cpu_sampler_pb2 as pb

log = logging.getLogger(__name__)


class Subscriber:
    """One Results stream: a bounded queue of batches; None in the queue ends the stream."""

    def __init__(self, max_queued: int):
        self.queue: queue.Queue[pb.SampledBatch | None] = queue.Queue(max_queued)
        self.max_queued = max_queued
        self.fell_behind = False

    def close(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:  # the stream is not waiting then; it sees the flag or goes away
            self.fell_behind = True

    def batches(self) -> Iterator[pb.SampledBatch]:
        """The batches published to this subscriber, until it is closed."""
        while True:
            if self.fell_behind:
                raise ResourceExhaustedError(f"Results subscriber fell {self.max_queued} batches behind; resubscribe")
            batch = self.queue.get()
            if batch is None:
                return
            yield batch


class Subscribers:
    """The current Results subscribers; `publish` hands a batch to each of them."""

    def __init__(self, max_queued: int):
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()

    def __len__(self) -> int:
        return len(self._subscribers)

    @property
    def num_queued(self) -> int:
        """Batches queued for the subscribers, all together."""
        with self._lock:
            return sum(subscriber.queue.qsize() for subscriber in self._subscribers)

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self._max_queued)
        with self._lock:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def publish(self, batch: pb.SampledBatch) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            log.warning("step %d sampled with no Results subscriber; its tokens are dropped", batch.step_id)
        for subscriber in subscribers:
            try:
                subscriber.queue.put_nowait(batch)
            except queue.Full:
                subscriber.fell_behind = True
                self.unsubscribe(subscriber)


class PlanBook:
    """Row plans by step, from the coordinator's Plans stream, taken by the Logits stream.

    A frame may arrive before its plan (the streams are independent): `take` waits for it. Plans
    whose frame never comes (a failed step) are dropped oldest first beyond `capacity`.
    """

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._plans: dict[int, pb.SamplePlan] = {}
        self._arrived = threading.Condition()

    def __len__(self) -> int:
        return len(self._plans)

    def put(self, plan: pb.SamplePlan) -> None:
        with self._arrived:
            self._plans[plan.step_id] = plan
            while len(self._plans) > self._capacity:
                del self._plans[next(iter(self._plans))]
            self._arrived.notify_all()

    def take(self, step_id: int, timeout_s: float) -> pb.SamplePlan | None:
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while step_id not in self._plans:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)
            return self._plans.pop(step_id)
