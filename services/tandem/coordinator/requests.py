"""One request on the coordinator, in one record: the scheduler's sequence (tokens, blocks,
sampler) plus the token-level stop rules and the queue its committed tokens go out on.

Text is not made here: the request's reader on the front turns the tokens into text and applies
stop strings (coordinator/front.py), so the engine's loop spends no time detokenizing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tandem.coordinator.request_trace import RequestTrace
from tandem.coordinator.steps import Sequence
from tandem.core.sampling.options import SamplingOptions
from tandem.v1 import common_pb2, cpu_sampler_pb2


@dataclass(frozen=True)
class End:
    """The last item on a request's queue: why it ended, and the error if it failed."""

    finish_reason: int
    error: Exception | None = None


Token = tuple[int, "common_pb2.SampleLogprobs | None"]  # a committed token id and its logprobs


class Outputs:
    """A request's committed tokens, then its End: put by the loop thread, taken by the request's
    one reader on the front. Readers are told there is something to take once per loop turn (the
    Engine's `on_outputs`), not per token."""

    def __init__(self) -> None:
        self._items: deque[Token | End] = deque()  # append and popleft are atomic across threads

    def put(self, item: Token | End) -> None:
        self._items.append(item)

    def has(self, num_tokens: int) -> bool:
        """Whether at least `num_tokens` tokens, or the end, wait to be taken."""
        items = self._items
        return len(items) >= num_tokens or (bool(items) and isinstance(items[-1], End))

    def take(self) -> list[Token | End]:
        """Everything put since the last take, oldest first; [] when nothing was."""
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items


def is_stop_token(options: SamplingOptions, eos_token_ids: frozenset[int], token_id: int) -> bool:
    return token_id in options.stop_token_ids or (token_id in eos_token_ids and not options.ignore_eos)


def token_finish_reason(options: SamplingOptions, eos_token_ids: frozenset[int], max_tokens: int,
                        output_ids: list[int]) -> int:
    """Whether the last of `output_ids` ends the request by a token rule: a stop token (once
    min_tokens are out) or the length limit. Stop strings are the front's (front.py)."""
    if is_stop_token(options, eos_token_ids, output_ids[-1]) and len(output_ids) >= options.min_tokens:
        return common_pb2.FINISH_REASON_STOP_TOKEN
    if len(output_ids) >= max_tokens:
        return common_pb2.FINISH_REASON_LENGTH
    return common_pb2.FINISH_REASON_UNSPECIFIED


@dataclass(eq=False, kw_only=True)
class Request(Sequence):
    """A request and its sequence. The loop thread owns it once submitted; the front's reader
    that made it takes `outputs`, and reads `scheduled_time` once a token has come out."""

    params: common_pb2.SamplingParams
    options: SamplingOptions
    seed: int
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    outputs: Outputs = field(default_factory=Outputs)
    trace: RequestTrace | None = None  # its spans, when it is traced (request_trace.py)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED

    def sampler_sequence(self, pending_token: int | None = None) -> cpu_sampler_pb2.SamplerSequence:
        """The request as a sampler replica holds it: its outputs so far, plus a token sampled
        in a step not committed yet. TypeError or ValueError for a value the wire cannot carry."""
        output_ids = self.output_ids if pending_token is None else [*self.output_ids, pending_token]
        return cpu_sampler_pb2.SamplerSequence(
            request_id=self.request_id, params=self.params, seed=self.seed, prompt_ids=self.prompt_ids,
            output_ids=output_ids, min_tokens_blocked_ids=sorted(self.eos_token_ids | set(self.options.stop_token_ids)),
        )

    def commit(self, logprobs: common_pb2.SampleLogprobs | None) -> None:
        """Send out the token the scheduler just committed (the last of `output_ids`) and end
        the request if a token rule says so."""
        self.outputs.put((self.output_ids[-1], logprobs))
        if self.trace is not None:
            self.trace.end_step()
        reason = token_finish_reason(self.options, self.eos_token_ids, self.max_tokens, self.output_ids)
        if reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = reason
            self.outputs.put(End(reason))

    def fail(self, finish_reason: int, error: Exception | None = None) -> None:
        """End the request early (abort, stop string, time limit, error)."""
        if self.trace is not None:
            self.trace.end_step()
        if not self.is_finished:
            self.finish_reason = finish_reason
            self.outputs.put(End(finish_reason, error))
