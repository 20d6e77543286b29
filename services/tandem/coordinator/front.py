"""The public front of one request: its committed tokens turned into what the client sees.

It runs in the request's coroutine on the server's asyncio loop, apart from the engine's loop:
incremental detokenization, stop strings, and text held back while it could still become a stop
string. `Wakeups` is how the engine's loop tells those coroutines their tokens are there.
The token rules (stop tokens, length) are the same function the loop applies, so both sides
end on the same token; a stop string is found only here, and the servicer then aborts the
request in the engine with FINISH_REASON_STOP_SEQUENCE.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from tandem.coordinator.requests import (
    End,
    Request,
    Token,
    is_stop_token,
    token_finish_reason,
)
from tandem.core.tokenizer import IncrementalDetokenizer
from tandem.v1 import common_pb2


@dataclass(frozen=True)
class Chunk:
    """What accumulated since the last read: new tokens and text, and the end if it came."""

    token_ids: list[int]
    text: str
    logprobs: list[common_pb2.SampleLogprobs]
    end: End | None = None


class TextStream:
    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer):
        self.request, self.detokenizer = request, detokenizer
        self.output_ids: list[int] = []
        self.logprobs: list[common_pb2.SampleLogprobs] = []
        self.text = ""
        self.finish_reason: Any = common_pb2.FINISH_REASON_UNSPECIFIED  # a FinishReason value
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self._emitted = 0  # characters of text already streamed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED

    def take(self) -> Chunk | None:
        """All of the request's tokens that have arrived, up to its end, as one chunk; None when
        nothing has since the last take."""
        items = self.request.outputs.take()
        if not items:
            return None
        token_ids: list[int] = []
        deltas: list[str] = []
        logprobs: list = []
        for item in items:
            if isinstance(item, End):
                self.finish_reason, self.finish_time = item.finish_reason, time.monotonic()
                return Chunk(token_ids, "".join(deltas), logprobs, item)
            deltas.append(self._add(item))
            token_ids.append(item[0])
            if item[1] is not None:
                logprobs.append(item[1])
            if self.is_finished:
                break
        return Chunk(token_ids, "".join(deltas), logprobs)

    def _add(self, token: Token) -> str:
        """Take one token, apply the stop rules; the text the client may see now."""
        token_id, logprobs = token
        self.first_token_time = self.first_token_time or time.monotonic()
        self.output_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        request = self.request
        if not (is_stop_token(request.options, request.eos_token_ids, token_id) and token_id in request.eos_token_ids):
            self.text += self.detokenizer.add(token_id)
        reason = token_finish_reason(request.options, request.eos_token_ids, request.max_tokens, self.output_ids)
        if reason != common_pb2.FINISH_REASON_STOP_TOKEN and self._match_stop_string():
            reason = common_pb2.FINISH_REASON_STOP_SEQUENCE
        if reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason, self.finish_time = reason, time.monotonic()
            if reason != common_pb2.FINISH_REASON_STOP_SEQUENCE:
                self.text += self.detokenizer.flush()
        visible = len(self.text) if self.is_finished else len(self.text) - self._holdback()
        delta = self.text[self._emitted : max(visible, self._emitted)]
        self._emitted = max(visible, self._emitted)
        return delta

    def _match_stop_string(self) -> bool:
        # Only text that could contain a new match is searched.
        stop = self.request.options.stop
        if not stop:
            return False
        start = max(0, self._emitted - max(len(s) for s in stop))
        hits = [i for s in stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _holdback(self) -> int:
        # Characters at the end that could still become the start of a stop string.
        longest = 0
        for s in self.request.options.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest


class Wakeups:
    """Wakes the coroutines reading requests the engine's loop gave outputs. The loop calls
    `notify` once a turn with all of them: one hand-over to the asyncio loop per turn, however
    many tokens and requests it carried (a wake-up per token would cost a system call each)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[Request, asyncio.Event] = {}  # by reader; only the asyncio loop touches it

    def watch(self, request: Request) -> asyncio.Event:
        """On the asyncio loop: the event set whenever `request` may have outputs to take."""
        self._loop = asyncio.get_running_loop()
        self._events[request] = event = asyncio.Event()
        return event

    def forget(self, request: Request) -> None:
        self._events.pop(request, None)

    def notify(self, requests: list[Request]) -> None:
        """From the engine's loop thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, requests)

    def _wake(self, requests: list[Request]) -> None:
        for request in requests:
            if (event := self._events.get(request)) is not None:
                event.set()
