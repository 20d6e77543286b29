"""One request's life on the coordinator, in one record: the scheduler's sequence (tokens,
blocks, sampler) plus what the client sees (text, stop rules, output queue, timings)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

from tandem.coordinator.scheduler import Sequence
from tandem.core.sampling import SamplingOptions
from tandem.core.tokenizer import IncrementalDetokenizer
from tandem.v1 import common_pb2, cpu_sampler_pb2


@dataclass
class Output:
    """What the servicer streams: new tokens, or the end (finish_reason set), or an error."""

    token_ids: list[int]
    text: str
    logprobs: list[common_pb2.SampleLogprobs]
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    error: Exception | None = None
    num_output_tokens: int = 0  # output tokens of the request so far, these included


@dataclass(eq=False, kw_only=True)
class Request(Sequence):
    """A request and its sequence. The loop thread owns it once submitted; the servicer thread
    that made it reads only its `outputs`, and the rest after the end comes out of them."""

    params: common_pb2.SamplingParams
    options: SamplingOptions
    seed: int
    eos_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    logprobs: list[common_pb2.SampleLogprobs] = field(default_factory=list)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    outputs: queue.Queue[Output] = field(default_factory=queue.Queue)
    _text: str = ""
    _emitted: int = 0  # characters of _text already streamed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED

    @property
    def text(self) -> str:
        return self._text

    def sampler_sequence(self, pending_token: int | None = None) -> cpu_sampler_pb2.SamplerSequence:
        """The request as a sampler replica holds it: its outputs so far, plus a token sampled
        in a step not committed yet. TypeError or ValueError for a value the wire cannot carry."""
        output_ids = self.output_ids if pending_token is None else [*self.output_ids, pending_token]
        return cpu_sampler_pb2.SamplerSequence(
            request_id=self.request_id, params=self.params, seed=self.seed, prompt_ids=self.prompt_ids,
            output_ids=output_ids, min_tokens_blocked_ids=sorted(self.eos_token_ids | set(self.options.stop_token_ids)),
        )

    def emit(self, logprobs: common_pb2.SampleLogprobs | None) -> None:
        """Take the token the scheduler just committed (the last of `output_ids`), apply the
        stop rules, and queue what the client may see."""
        token_id = self.output_ids[-1]
        self.first_token_time = self.first_token_time or time.monotonic()
        if logprobs is not None:
            self.logprobs.append(logprobs)
        opts = self.options
        is_stop_token = token_id in opts.stop_token_ids or (token_id in self.eos_token_ids and not opts.ignore_eos)
        if not (is_stop_token and token_id in self.eos_token_ids):
            self._text += self.detokenizer.add(token_id)
        if is_stop_token and len(self.output_ids) >= opts.min_tokens:
            self.finish_reason = common_pb2.FINISH_REASON_STOP_TOKEN
        elif self._match_stop_string():
            self.finish_reason = common_pb2.FINISH_REASON_STOP_SEQUENCE
        elif len(self.output_ids) >= self.max_tokens:
            self.finish_reason = common_pb2.FINISH_REASON_LENGTH
        if self.is_finished and self.finish_reason != common_pb2.FINISH_REASON_STOP_SEQUENCE:
            self._text += self.detokenizer.flush()
        visible = len(self._text) if self.is_finished else len(self._text) - self._holdback()
        delta = self._text[self._emitted : max(visible, self._emitted)]
        self._emitted = max(visible, self._emitted)
        logprobs_list = [logprobs] if logprobs is not None else []
        self.outputs.put(Output([token_id], delta, logprobs_list, num_output_tokens=len(self.output_ids)))
        if self.is_finished:
            self._end(self.finish_reason)

    def fail(self, finish_reason: int, error: Exception | None = None) -> None:
        """End the request early (abort, time limit, error)."""
        if not self.is_finished:
            self.finish_reason = finish_reason
            self._end(finish_reason, error)

    def _end(self, finish_reason: int, error: Exception | None = None) -> None:
        self.finish_time = time.monotonic()
        self.outputs.put(Output([], "", [], finish_reason, error, len(self.output_ids)))

    def _match_stop_string(self) -> bool:
        # Only text that could contain a new match is searched.
        if not self.options.stop:
            return False
        start = max(0, self._emitted - max(len(s) for s in self.options.stop))
        hits = [i for s in self.options.stop if (i := self._text.find(s, start)) >= 0]
        if hits:
            self._text = self._text[: min(hits)]
        return bool(hits)

    def _holdback(self) -> int:
        # Characters at the end that could still become the start of a stop string.
        longest = 0
        for s in self.options.stop:
            for n in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:n]):
                    longest = n
                    break
        return longest
