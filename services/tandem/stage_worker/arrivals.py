"""What a step waits for before it computes: its activations from the previous stage, and on
stage 0 of a chained step the tokens the last stage sampled for the step it names. gRPC-free.

Each coordinator plan stream is an epoch. A newer stream supersedes the plans of older ones not
yet run (the coordinator reset its streams after a stage failed, and replans): a step of an older
epoch that waits here is woken and gives up; one waiting when the stage stops is neither computed
nor answered (StageStopped): the coordinator sees the stage's streams end.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from tandem.core.errors import InvalidArgumentError
from tandem.core.wire.frames import Arrived
from tandem.stage_worker.tokens import TokenBook

T = TypeVar("T")
POLL_S = 0.5  # a waiting step looks at the clock this often, whatever wakes it


class StageStopped(Exception):
    """The stage stopped while a step waited for what it needs."""


class Arrivals:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._activations: dict[int, Arrived] = {}
        self._tokens = TokenBook()  # stage 0: the last stage's tokens by step
        self.epoch = 0
        self._stopped = False

    def new_epoch(self) -> int:
        """A new plan stream's epoch; steps waiting for an older one give up."""
        with self._cond:
            self.epoch += 1
            self._cond.notify_all()
            return self.epoch

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def put_activations(self, step_id: int, hidden: Arrived) -> None:
        with self._cond:
            self._activations[step_id] = hidden
            self._cond.notify_all()

    def drop_activations(self, step_id: int) -> None:
        with self._cond:
            self._activations.pop(step_id, None)

    def take_all_activations(self) -> dict[int, Arrived]:
        """Every step's activations that came and were not taken, taken now."""
        with self._cond:
            taken, self._activations = self._activations, {}
            return taken

    def put_tokens(self, step_id: int, request_ids: Sequence[str], token_ids: Sequence[int]) -> None:
        with self._cond:
            self._tokens.put(step_id, request_ids, token_ids)
            self._cond.notify_all()

    def activations(self, step_id: int, epoch: int) -> Arrived:
        """Step `step_id`'s activations once they come (taken: they are handed out once)."""
        return self._wait(step_id, epoch, lambda: self._activations.pop(step_id, None), "its activations")

    def tokens(self, step_id: int, input_step_id: int, epoch: int, timeout_s: float) -> dict[str, int]:
        """Request id -> token of step `input_step_id`, for step `step_id` that takes them as its input."""
        return self._wait(step_id, epoch, lambda: self._tokens.get(input_step_id),
                          f"the tokens of step {input_step_id}", timeout_s)

    def _wait(self, step_id: int, epoch: int, take: Callable[[], T | None], what: str,
              timeout_s: float = math.inf) -> T:
        """What `take` finds once it is there; InvalidArgumentError when a newer plan stream
        supersedes the step or `timeout_s` passes, StageStopped when the stage stops."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (found := take()) is None:
                if self._stopped:
                    raise StageStopped(f"step {step_id}: the stage stopped")
                if epoch != self.epoch:
                    raise InvalidArgumentError(f"step {step_id}: superseded by a newer plan stream")
                if time.monotonic() > deadline:
                    raise InvalidArgumentError(f"step {step_id}: {what} did not come within {timeout_s:.0f}s")
                self._cond.wait(timeout=POLL_S)
            return found
